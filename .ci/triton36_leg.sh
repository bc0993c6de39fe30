# shellcheck shell=bash
# The CI leg with the GPU machine's Triton, sourced by .ci/run after the main leg (it uses run_pytest
# and summary from there). Run from the repository root:
#   triton36_leg VENV_DIR MAIN_LEG_SO
#
# The GPU machine runs Python 3.12, torch 2.11.0+cu130, triton 3.6.0 and numpy 2.5. This leg matches
# what matters for the kernels there, Triton 3.6.0 (its interpreter and its compiler/ptxas for the
# compile report) with a numpy >= 2.4 (which is what breaks Triton 3.6's interpreter, see
# tests/conftest.py), but on Python 3.11 with the CPU torch 2.13.0: no CPU build of torch for
# Python 3.12 lies on this machine, and a CUDA build of torch must never be pulled into CI. numpy
# 2.4.6 is the newest numpy for Python 3.11 (numpy 2.5 needs 3.12).
#
# The project is installed from this tree without building anything (FOCALNET_SKIP_EXT=1), then the
# main leg's compiled extension (MAIN_LEG_SO: same CPython ABI; the extension does not link libtorch)
# is copied next to it, so there is no second nvcc/CMake build.
#
# Then a subset of the CUDA backend's tests runs in the CPU emulator (csrc/cuda/emu): every level
# count 1-4 with window families 3 (kernels 3..9) and 9 (kernels 9..15) in fp32/fp16/bf16, normalized
# or not; strided, channels-first, offset and broadcast views; NaN/Inf propagation; each forward and
# backward against the fp64 reference. A change that breaks the CUDA backend fails CI this way.
# Both parts run even when the first fails; the leg fails if either does.
TRITON36_TESTS=(tests/test_triton_fwd.py tests/test_triton_bwd.py tests/test_op.py tests/test_report.py
                tests/test_modulation_tail.py)
CUDA_EMU_SUBSET="levels_and_windows or nan_inf or strided or tensor_core or global_term or backward_plan"

triton36_leg() {
  local venv=$1 so=$2 t0 py site
  t0=$(date +%s)
  python3 -m venv "$venv"
  py="$venv/bin/python"
  "$py" -m pip install -q --upgrade pip
  # torch 2.13.0 is the CPU build that lies on disk (never a CUDA build: checked below)
  "$py" -m pip install -q torch==2.13.0 triton==3.6.0 numpy==2.4.6 pytest hypothesis pybind11 setuptools wheel
  FOCALNET_SKIP_EXT=1 "$py" -m pip install -q --no-deps --no-build-isolation .
  site=$(cd "$(dirname "$venv")" && "$py" -c "import focalnet_kernels, os; print(os.path.dirname(focalnet_kernels.__file__))")
  cp "$so" "$site/"
  (cd "$(dirname "$venv")" && "$py" - "$so" <<'PY'
import os, shutil, sys
import numpy, torch, triton, focalnet_kernels
assert torch.version.cuda is None, f"CI must run a CPU torch, got CUDA {torch.version.cuda}"
assert triton.__version__ == "3.6.0", triton.__version__
assert numpy.__version__ == "2.4.6", numpy.__version__
assert focalnet_kernels.__file__.startswith(sys.prefix), focalnet_kernels.__file__
info = focalnet_kernels.build_info()
print("CI: [triton36] torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__,
      "build_info:", info)
assert info["extension"] and "cpu" in info["backends"], info
if shutil.which("nvcc"):
    assert "cuda" in info["backends"], "the main leg's extension has no CUDA backend"
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
assert os.access(cuobjdump, os.X_OK), "triton 3.6.0's wheel has no cuobjdump: the compile report would skip"
PY
  ) || { summary+=("CI: [triton36] FAILED: environment check"); return 1; }
  summary+=("CI: [triton36] venv (python 3.11, torch 2.13.0 cpu, triton 3.6.0, numpy 2.4.6): $(( $(date +%s) - t0 )) s")

  # the interpreter, op and compile-report tests; the venv's pytest script (not python -m pytest,
  # which would put the source tree first on sys.path) imports the installed package, as the main
  # leg does; conftest switches the interpreter on
  local failed=0
  run_pytest triton36-tests /tmp/focalnet-ci-triton36.log \
    env PATH="$venv/bin:$PATH" "$venv/bin/pytest" -q -p no:cacheprovider "${TRITON36_TESTS[@]}" || failed=1

  # the CUDA backend's kernels in the CPU emulator (g++ build of csrc/cuda against fc_emu.h; its
  # plugin stands in for focalnet_kernels._C)
  local emu_out; emu_out=$(mktemp -d)
  run_pytest cuda-emulator /tmp/focalnet-ci-cuda-emu.log \
    env PATH="$venv/bin:$PATH" PYTHON="$py" FC_EMU_OUT="$emu_out" \
    bash csrc/cuda/emu/run_emulated_tests.sh -k "$CUDA_EMU_SUBSET" || failed=1
  rm -rf "$emu_out"
  return "$failed"
}
