#!/usr/bin/env bash
# Build, on a CPU machine with nvcc, the wheel that the GPU suite installs on a GPU machine with no
# compiler time to spare (benchmarks/gpu_suite.sh installs it with pip --no-deps --no-index and builds
# from source only when no wheel fits):
#
#   bash benchmarks/gpu_prepare.sh            # -> wheelhouse/focalnet_kernels-<v>-cp312-cp312-linux_x86_64.whl
#                                             #    and its .stamp (benchmarks/source_stamp.py of the tree)
#
# The extension does not link libtorch (only pybind11 and the static CUDA runtime), so one wheel per
# CPython version serves every torch (2.11 on the GPU machine, 2.13 here). This is how the project's
# wheels are made: PY (default: a CPython 3.12 from pyenv) picks the CPython, FOCALNET_CUDA_ARCHS
# (default 80;90, PTX of 90 embedded) the GPUs.
#
# REV=<git revision> builds from a clean checkout of that revision (a temporary git worktree) instead
# of the working tree, e.g. REV=HEAD while uncommitted work is in progress; the stamp is then that
# checkout's, and gpu_suite.sh needs FOCALNET_WHEEL_ANY=1 to install it into a tree that differs.
#
# Checks before it says "ok": the wheel holds _C for that CPython, _C imports (without torch) and
# reports the cpu and cuda backends and the archs, and cuobjdump finds sm_90 code in it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WHEELHOUSE=${WHEELHOUSE:-$ROOT/wheelhouse}
export FOCALNET_CUDA_ARCHS=${FOCALNET_CUDA_ARCHS:-80;90}

PY=${PY:-}
if [ -z "$PY" ]; then
  for cand in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
    [ -x "$cand" ] && { PY=$cand; break; }
  done
fi
[ -n "$PY" ] && [ -x "$PY" ] || { echo "gpu_prepare: no CPython 3.12 found (set PY=/path/to/python3.12)"; exit 2; }
command -v nvcc >/dev/null || { echo "gpu_prepare: nvcc is not on PATH: the wheel would have no CUDA backend"; exit 2; }
SRC=$ROOT
if [ -n "${REV:-}" ]; then
  # one persistent worktree (ignored build/ folder): checking out the next revision leaves unchanged
  # files and the CMake build tree in place, so a Python-only change does not recompile the CUDA code
  SRC=$ROOT/build/gpu_prepare-src
  rev=$(git -C "$ROOT" rev-parse --verify "$REV^{commit}")
  if [ ! -e "$SRC/.git" ]; then
    git -C "$ROOT" worktree prune
    git -C "$ROOT" worktree add --detach "$SRC" "$rev" >/dev/null
  else
    git -C "$SRC" checkout --quiet --detach --force "$rev"
    git -C "$SRC" clean -fdq    # untracked files go, ignored ones (its build/) stay
  fi
  echo "gpu_prepare: building $(git -C "$SRC" rev-parse --short HEAD) ($REV) from a clean checkout in $SRC"
fi
pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
echo "gpu_prepare: CPython $("$PY" -V 2>&1) at $PY, nvcc $(nvcc --version | tail -n 1), archs $FOCALNET_CUDA_ARCHS"

# build tools only (no torch: the extension does not need it), in a venv kept beside the wheels so
# that a rebuild after a Python-only change reuses the compiled objects (same paths, ninja skips nvcc)
venv=$ROOT/build/gpu_prepare-env-cp$pyver
if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q setuptools wheel "pybind11>=2.11" "cmake>=3.18" ninja
fi

mkdir -p "$WHEELHOUSE"
rm -f "$WHEELHOUSE"/focalnet_kernels-*-cp"$pyver"-*.whl "$WHEELHOUSE"/focalnet_kernels-*-cp"$pyver"-*.whl.stamp
start=$(date +%s)
# --no-build-isolation: the venv above is the build environment (pyproject's requires are in it)
stamp=$("$PY" "$ROOT/benchmarks/source_stamp.py" "$SRC")
"$venv/bin/python" -m pip wheel --no-deps --no-build-isolation -w "$WHEELHOUSE" "$SRC"
echo "gpu_prepare: built in $(( $(date +%s) - start )) s"
whl=$(ls -t "$WHEELHOUSE"/focalnet_kernels-*-cp"$pyver"-*.whl | head -n 1)
# the stamp of the sources it was built from: gpu_suite.sh installs the wheel only if the tree matches
# (taken before the build; a source edited during the build makes the wheel unusable, not mislabelled)
if [ "$("$PY" "$ROOT/benchmarks/source_stamp.py" "$SRC")" != "$stamp" ]; then
  echo "gpu_prepare: the sources changed during the build: run it again"; exit 1
fi
echo "$stamp" > "$whl.stamp"

# check what is inside: the extension for this CPython, importable, with the CUDA backend and archs
chk=$(mktemp -d)
(cd "$chk" && "$venv/bin/python" -m zipfile -e "$whl" .)
so=$(ls "$chk"/focalnet_kernels/_C.cpython-"$pyver"-*.so)
"$venv/bin/python" - "$so" <<'PY'
import importlib.machinery, importlib.util, os, sys
path = sys.argv[1]
loader = importlib.machinery.ExtensionFileLoader("_C", path)
spec = importlib.util.spec_from_loader("_C", loader)
mod = importlib.util.module_from_spec(spec)
loader.exec_module(mod)
info = dict(mod.BUILD_INFO)
print("gpu_prepare: _C BUILD_INFO", info)
want = [a for a in os.environ["FOCALNET_CUDA_ARCHS"].replace(",", ";").split(";") if a]
assert "cpu" in list(info["backends"]) and "cuda" in list(info["backends"]), info
assert str(info["cuda_archs"]).split(",") == want, (info["cuda_archs"], want)
PY
# cuobjdump: the CUDA toolkit's, else the one in a Triton wheel (CUOBJDUMP= overrides)
cuobjdump=${CUOBJDUMP:-$(command -v cuobjdump || true)}
for cand in "$(dirname "$(readlink -f "$(command -v nvcc)")")/cuobjdump" \
            "$ROOT"/../venv*/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump; do
  [ -z "$cuobjdump" ] && [ -x "$cand" ] && cuobjdump=$cand
done
if [ -n "$cuobjdump" ]; then
  "$cuobjdump" --list-elf "$so" | grep -q "sm_90" || { echo "gpu_prepare: no sm_90 code in $so"; exit 1; }
  echo "gpu_prepare: cubins: $("$cuobjdump" --list-elf "$so" | grep -o 'sm_[0-9]*' | sort | uniq -c | tr -s ' ' | tr '\n' ' ')"
else
  echo "gpu_prepare: no cuobjdump found (set CUOBJDUMP=): the cubin check is skipped; BUILD_INFO above lists the archs"
fi
rm -rf "$chk"
ls -la "$whl"
echo "gpu_prepare: ok: $whl"
