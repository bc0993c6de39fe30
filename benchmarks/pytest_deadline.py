"""pytest plugin for the time-boxed GPU suite: `pytest -p benchmarks.pytest_deadline`.

A test that would start after FOCALNET_TEST_DEADLINE (seconds since the epoch) is skipped with that
reason instead of being run, so a run that is out of time still ends by itself, with its junit XML
and its summary written (a `timeout` kill would leave neither). Without the variable it does nothing.
"""
import os
import time

import pytest


def pytest_runtest_setup(item):
    deadline = os.environ.get("FOCALNET_TEST_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("GPU suite: its time budget for tests was spent before this test started")
