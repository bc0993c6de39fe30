#!/usr/bin/env bash
# The GPU suite in one command (fits a 10-minute slot, build included), from the repository root of a
# bare GPU machine with torch, triton, timm, pybind11, cmake, ninja and nvcc installed and NO network:
#
#   bash benchmarks/gpu_suite.sh [--quick] [--out DIR] [-- extra focalnet-bench arguments]
#
#   1. pip install --no-build-isolation --no-deps --no-index .   (log: build.log)
#   2. focalnet_kernels.build_info()                              (build_info.json)
#   3. pytest -m gpu tests -q                                     (pytest-gpu.log, junit-gpu.xml)
#   4. python -m benchmarks [--quick] --budget <time left>        (results.json, results.png, table.txt)
#   5. python -m benchmarks.cuda_preference results.json          (cuda_preference.txt: the auto table)
#
# Everything lands in one folder, benchmarks/results/<stamp>-<device>/ (or --out DIR), with suite.log.
# Exit status: 0 all good; 1 tests failed (the benchmark still ran); 2 build failed (no benchmark);
# 3 the benchmark failed or a section errored.
# Time: SUITE_SECONDS (default 570) is the whole budget; the build gets at most BUILD_SECONDS (default 300),
# the tests at most TEST_SECONDS (default 240, less when time is short), the benchmark the rest.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
T0=$(date +%s)
SUITE_SECONDS=${SUITE_SECONDS:-570}
BUILD_SECONDS=${BUILD_SECONDS:-300}
TEST_SECONDS=${TEST_SECONDS:-240}

QUICK=""
OUTDIR=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK="--quick"; shift ;;
    --out) OUTDIR="$2"; shift 2 ;;
    --) shift; EXTRA+=("$@"); break ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( SUITE_SECONDS - $(elapsed) )); }

gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
slug=$(printf '%s' "${gpu_name:-gpu}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//' | cut -c1-48)
stamp=$(date +%Y%m%d-%H%M%S)
OUT=${OUTDIR:-"$ROOT/benchmarks/results/$stamp-${slug:-gpu}"}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/suite.log"
exec > >(tee -a "$LOG") 2>&1

say() { printf '[%4ss] %s\n' "$(elapsed)" "$*"; }

say "gpu_suite: output folder $OUT"
say "GPU: ${gpu_name:-none found}"
nvidia-smi 2>/dev/null | head -n 15 || true
command -v nvcc >/dev/null && nvcc --version | tail -n 2 || say "nvcc not on PATH (the CUDA backend will not be built)"
python -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| cuda available', torch.cuda.is_available())"
python -c "import triton; print('triton', triton.__version__)" 2>/dev/null || say "triton not importable"
python -c "import timm; print('timm', timm.__version__)" 2>/dev/null || say "timm not importable (Swin from transformers)"

# ---- 1. build --------------------------------------------------------------------------------
if [ -z "${FOCALNET_CUDA_ARCHS:-}" ]; then  # only this GPU's architecture: halves the nvcc time
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d '. ')
  if [ -n "$cap" ]; then export FOCALNET_CUDA_ARCHS="$cap"; fi
fi
say "build: pip install --no-build-isolation --no-deps --no-index . (FOCALNET_CUDA_ARCHS=${FOCALNET_CUDA_ARCHS:-default}; log build.log)"
export PIP_DISABLE_PIP_VERSION_CHECK=1
timeout -k 10 "$BUILD_SECONDS" python -m pip install --no-build-isolation --no-deps --no-index -v . > "$OUT/build.log" 2>&1
build_rc=$?
say "build: exit $build_rc"
if [ $build_rc -ne 0 ]; then
  grep -n -i -E "error|failed" "$OUT/build.log" | head -n 40
  tail -n 30 "$OUT/build.log"
  say "gpu_suite: the build failed: no tests, no benchmark"
  echo "build_rc=$build_rc" > "$OUT/summary.txt"
  exit 2
fi
grep -E "focalnet: building|ptxas|Successfully installed" "$OUT/build.log" | head -n 20

# The source tree holds focalnet_kernels/ without the compiled _C (*.so are not committed): run Python
# from the output folder so that the installed package is the one imported.
( cd "$OUT" && python -c "
import json, focalnet_kernels
info = focalnet_kernels.build_info()
info['imported_from'] = focalnet_kernels.__file__
print(json.dumps(info, indent=1))
open('build_info.json', 'w').write(json.dumps(info, indent=1))
" ) || say "build_info failed"

# ---- 2. GPU tests --------------------------------------------------------------------------------
bench_min=$([ -n "$QUICK" ] && echo 150 || echo 240)
t_tests=$(( $(left) - bench_min ))
[ $t_tests -gt "$TEST_SECONDS" ] && t_tests=$TEST_SECONDS
[ $t_tests -lt 60 ] && t_tests=60
say "tests: pytest -m gpu tests -q (limit ${t_tests}s; log pytest-gpu.log, junit-gpu.xml)"
# run from the output folder too (the installed package, not the source tree, must be imported);
# the repository's pyproject.toml still provides the configuration and the markers
( cd "$OUT" && timeout -k 10 "$t_tests" python -m pytest -m gpu "$ROOT/tests" -q -p no:cacheprovider \
    --rootdir "$ROOT" -c "$ROOT/pyproject.toml" --junitxml="$OUT/junit-gpu.xml" ) > "$OUT/pytest-gpu.log" 2>&1
test_rc=$?
tail -n 25 "$OUT/pytest-gpu.log"
case $test_rc in
  0) say "tests: passed" ;;
  5) say "tests: no GPU-marked test was collected (not counted as a failure)"; test_rc=0 ;;
  124|137) say "tests: TIMED OUT after ${t_tests}s" ;;
  *) say "tests: FAILED (exit $test_rc)" ;;
esac

# ---- 3. benchmark --------------------------------------------------------------------------------
budget=$(( $(left) - 25 ))
default_budget=$([ -n "$QUICK" ] && echo 200 || echo 480)
[ $budget -gt "$default_budget" ] && budget=$default_budget
if [ $budget -lt 30 ]; then
  say "benchmark: only ${budget}s left: running it with that budget anyway (most sections will be skipped)"
  [ $budget -lt 10 ] && budget=10
fi
say "benchmark: python -m benchmarks $QUICK --budget $budget --out $OUT ${EXTRA[*]:-}"
( cd "$OUT" && timeout -s INT -k 20 $(( budget + 45 )) python -m benchmarks $QUICK --budget "$budget" --out "$OUT" "${EXTRA[@]}" )
bench_rc=$?
say "benchmark: exit $bench_rc"
if [ -f "$OUT/results.json" ]; then
  # the measured triton-vs-cuda choice per configuration; commit it with
  #   python -m benchmarks.cuda_preference benchmarks/results/<this folder>/results.json --write
  say "auto table (cuda_preference.txt):"
  ( cd "$OUT" && python -m benchmarks.cuda_preference "$OUT/results.json" ) > "$OUT/cuda_preference.txt" 2>&1
  cat "$OUT/cuda_preference.txt"
fi

{
  echo "build_rc=$build_rc"
  echo "test_rc=$test_rc"
  echo "bench_rc=$bench_rc"
  echo "elapsed_s=$(elapsed)"
  echo "folder=$OUT"
} > "$OUT/summary.txt"
say "gpu_suite: done in $(elapsed)s; build $build_rc, tests $test_rc, benchmark $bench_rc; folder $OUT"
ls -la "$OUT"
if [ $test_rc -ne 0 ]; then exit 1; fi
if [ $bench_rc -ne 0 ]; then exit 3; fi
exit 0
