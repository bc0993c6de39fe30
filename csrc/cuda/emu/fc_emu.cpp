// Definitions for fc_emu.h and stubs of the few CUDA runtime calls the host code makes.
#include "fc_emu.h"
thread_local EmuCtx emu_t;
dim3 emu_grid;
std::atomic<long> emu_blocks_run{0};
extern "C" {
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void*) {
  memset(a, 0, sizeof(*a));
  a->type = cudaMemoryTypeDevice;
  a->device = 0;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* v, enum cudaDeviceAttr attr, int) {  // an H100's
  *v = attr == cudaDevAttrMaxSharedMemoryPerMultiprocessor ? 233472 : attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? 232448 : 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int) { return cudaSuccess; }
const char* cudaGetErrorName(cudaError_t) { return "emulated"; }
const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
}
extern "C" cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  memset(p, v, n);
  return cudaSuccess;
}
