#!/usr/bin/env bash
# Execute the CUDA backend's kernels on the CPU (no GPU needed): builds csrc/cuda/focal_context_cuda.cu
# with g++ against fc_emu.h into a throw-away _C module and runs tests/test_cuda_backend.py through
# fc_emu_plugin.py on CPU tensors. Slow (one OS thread per CUDA thread): pick tests with -k.
#   csrc/cuda/emu/run_emulated_tests.sh -k "levels_and_windows or nan_inf"
# SAN=address|thread adds a sanitizer (run the driver with LD_PRELOAD of libasan/libtsan then;
# ASan cannot intercept C++ exceptions thrown in a preloaded process, so skip test_invalid_arguments_raise).
# FC_BWD_TARGET_BLOCKS=4 makes every backward slot walk many tiles. EMU_FLAGS adds compiler flags
# (e.g. EMU_FLAGS=-DFC_MMA_BF16_NS=1).
# With an editable install, move focalnet_kernels/_C*.so aside for SAN= runs: its second registration of
# FocalContextArgs throws at import, which a preloaded ASan cannot intercept.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
out=${FC_EMU_OUT:-/tmp/fc_emu_build}
mkdir -p "$out/mod"
PY=${PYTHON:-python}
pyinc=$($PY -c "import sysconfig;print(sysconfig.get_paths()['include'])")
pbinc=$($PY -c "import pybind11;print(pybind11.get_include())")
suffix=$($PY -c "import sysconfig;print(sysconfig.get_config_var('EXT_SUFFIX'))")
cuda_inc=${CUDA_HOME:-/usr/local/cuda}/include
san=""
case "${SAN:-}" in address) san="-fsanitize=address -fno-omit-frame-pointer";; thread) san="-fsanitize=thread";; esac
flags="${EMU_FLAGS:-} -std=c++20 -O1 -g -fPIC -w -I$cuda_inc -I$root/csrc -I$here $san -DFOCALNET_WITH_CUDA -DFC_BWD_TARGET_BLOCKS=${FC_BWD_TARGET_BLOCKS:-2048}"
cat > "$out/cpu_stub.cpp" <<'CPP'
#include <stdexcept>
#include "focal_context.h"
namespace focalnet {
int64_t focal_context_workspace_bytes_cpu(const FocalContextArgs&, bool) { return 0; }
void focal_context_fwd_cpu(const FocalContextArgs&) { throw std::runtime_error("not in the emulated module"); }
void focal_context_bwd_cpu(const FocalContextArgs&) { throw std::runtime_error("not in the emulated module"); }
const char* focal_context_cpu_isa() { return "base"; }
}
CPP
pids=()
g++ $flags -c "$here/fc_emu.cpp" -o "$out/emu.o" & pids+=($!)
g++ $flags -include "$here/fc_emu.h" -x c++ -c "$root/csrc/cuda/focal_context_cuda.cu" -o "$out/fcc.o" & pids+=($!)
g++ $flags -I"$pyinc" -I"$pbinc" -c "$root/csrc/bindings.cpp" -o "$out/bind.o" & pids+=($!)
g++ $flags -c "$out/cpu_stub.cpp" -o "$out/cpu.o" & pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done
g++ -shared $san -o "$out/mod/_C$suffix" "$out/emu.o" "$out/fcc.o" "$out/bind.o" "$out/cpu.o" -lpthread
cd "$root"
FC_EMU_MODULE_DIR="$out/mod" PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" \
  $PY -m pytest -p fc_emu_plugin tests/test_cuda_backend.py -p no:cacheprovider -q "$@"
