"""The stamp of the sources a wheel is built from (stdlib only; run as a script, any Python).

    python benchmarks/source_stamp.py [ROOT]     # prints one sha256 hex digest

benchmarks/gpu_prepare.sh writes it beside the wheel it builds; benchmarks/gpu_suite.sh installs that
wheel only when the stamp still matches the tree it runs in, so a GPU run never tests stale code.
"""
import hashlib
import os
import sys

PACKAGES = ("focalnet", "focalnet_kernels", "benchmarks", "csrc")
TOP_FILES = ("setup.py", "CMakeLists.txt", "pyproject.toml")
SUFFIXES = (".py", ".c", ".cc", ".cpp", ".h", ".hpp", ".cu", ".cuh", ".inc")


def source_files(root):
    files = [f for f in TOP_FILES if os.path.isfile(os.path.join(root, f))]
    for pkg in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, pkg)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and d != "results")
            for name in sorted(filenames):
                if name.endswith(SUFFIXES):
                    files.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(files)


def stamp(root):
    h = hashlib.sha256()
    for rel in source_files(root):
        h.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


if __name__ == "__main__":
    print(stamp(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
