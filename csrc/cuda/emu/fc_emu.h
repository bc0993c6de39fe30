// CPU emulation of the CUDA execution model, to execute the focal-context kernels (the very same
// source, compiled by g++ as C++20) where no GPU exists: one std::thread per CUDA thread, a
// std::barrier per block (__syncthreads) and per warp (shuffles); blocks run one after another.
// Dynamic shared memory is a fresh malloc per block filled with NaN, so a read of uninitialised
// shared memory that reaches a result shows up as NaN; 16-byte vector accesses are checked for
// alignment (a CPU would not fault). With -fsanitize=address out-of-bounds accesses are caught,
// with -fsanitize=thread unsynchronised shared-memory accesses (races) are reported.
// Used by run_emulated_tests.sh; not part of the extension build.
#pragma once
#define FC_EMULATION 1
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <barrier>
#include <thread>
#include <vector>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <cstdio>
#include <atomic>
#define __launch_bounds__(...)
struct EmuCtx { uint3 tid; uint3 bid; float* smem; std::barrier<>* bbar; std::barrier<>* wbar; float* wbuf; };
extern thread_local EmuCtx emu_t;
extern dim3 emu_grid;
extern std::atomic<long> emu_blocks_run;
#define threadIdx (emu_t.tid)
#define blockIdx (emu_t.bid)
#define gridDim (emu_grid)
inline void __syncthreads() { emu_t.bbar->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int off) {
  const int lane = threadIdx.x & 31;
  emu_t.wbuf[lane] = v;
  emu_t.wbar->arrive_and_wait();
  const float r = emu_t.wbuf[lane ^ off];
  emu_t.wbar->arrive_and_wait();
  return r;
}
inline int min(int a, int b) { return a < b ? a : b; }
#define FC_DYN_SMEM(name) float* name = emu_t.smem
template <typename... P, typename... A>
void emu_launch(void (*fn)(P...), unsigned grid, unsigned block, size_t smem, A&&... args) {
  emu_grid = dim3(grid, 1, 1);
  for (unsigned b = 0; b < grid; ++b) {
    float* sm = (float*)malloc(smem ? smem : 4);  // exact size: ASan catches any overflow
    for (size_t i = 0; i < smem / 4; ++i) { uint32_t u = 0x7fc00000u; memcpy(sm + i, &u, 4); }
    std::barrier<> bbar(block);
    const unsigned nw = (block + 31) / 32;
    std::vector<std::barrier<>*> wb(nw);
    std::vector<float> wbuf(nw * 32);
    for (unsigned w = 0; w < nw; ++w) wb[w] = new std::barrier<>(32);
    std::vector<std::thread> th;
    th.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      th.emplace_back([&, t]() {
        emu_t.tid = make_uint3(t, 0, 0);
        emu_t.bid = make_uint3(b, 0, 0);
        emu_t.smem = sm;
        emu_t.bbar = &bbar;
        emu_t.wbar = wb[t / 32];
        emu_t.wbuf = wbuf.data() + (t / 32) * 32;
        fn(P(args)...);
      });
    }
    for (auto& x : th) x.join();
    for (auto* w : wb) delete w;
    free(sm);
    ++emu_blocks_run;
  }
}
#define FC_LAUNCH(fn, grid, block, smem, stream, ...) emu_launch(fn, (unsigned)(grid), (unsigned)(block), (size_t)(smem), __VA_ARGS__)
inline void emu_check_align16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) { fprintf(stderr, "EMU: misaligned 16-byte access %p\n", p); abort(); }
}
#define FC_CHECK_ALIGN16(ptr) emu_check_align16((const void*)(ptr))
