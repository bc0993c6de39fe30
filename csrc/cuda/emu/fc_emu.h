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
#include <type_traits>
#define __launch_bounds__(...)
struct EmuCtx { uint3 tid; uint3 bid; float* smem; std::barrier<>* bbar; std::barrier<>* wbar; float* wbuf; uint32_t* xbuf; };
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
inline void __syncwarp(unsigned = 0xffffffffu) { emu_t.wbar->arrive_and_wait(); }
inline void emu_check_align16(const void* p);
// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8m..8m+7 give the row addresses of matrix m;
// lane l receives from matrix m the 32 bits at row l/4, bytes 4*(l%4) (PTX ISA fragment layout).
inline void emu_ldsm_x4(uint32_t (&a)[4], const void* p) {
  const int lane = threadIdx.x & 31;
  emu_check_align16(p);
  uint64_t* pb = reinterpret_cast<uint64_t*>(emu_t.xbuf);
  pb[lane] = reinterpret_cast<uint64_t>(p);
  emu_t.wbar->arrive_and_wait();
  for (int m = 0; m < 4; ++m) memcpy(&a[m], reinterpret_cast<const char*>(pb[8 * m + lane / 4]) + 4 * (lane % 4), 4);
  emu_t.wbar->arrive_and_wait();
}
// ldmatrix...x4.trans: lane l receives from matrix m the 16-bit elements (row 2(l%4), column l/4) (low half)
// and (row 2(l%4) + 1, column l/4) (high half), rows addressed by lanes 8m..8m+7 as above.
inline void emu_ldsm_x4_trans(uint32_t (&a)[4], const void* p) {
  const int lane = threadIdx.x & 31;
  emu_check_align16(p);
  uint64_t* pb = reinterpret_cast<uint64_t*>(emu_t.xbuf);
  pb[lane] = reinterpret_cast<uint64_t>(p);
  emu_t.wbar->arrive_and_wait();
  const int t = lane % 4, g = lane / 4;
  for (int m = 0; m < 4; ++m) {
    uint16_t lo, hi;
    memcpy(&lo, reinterpret_cast<const char*>(pb[8 * m + 2 * t]) + 2 * g, 2);
    memcpy(&hi, reinterpret_cast<const char*>(pb[8 * m + 2 * t + 1]) + 2 * g, 2);
    a[m] = (uint32_t)lo | ((uint32_t)hi << 16);
  }
  emu_t.wbar->arrive_and_wait();
}
inline float emu_h2f(uint16_t u, bool f16) {
  if (f16) { __half h; memcpy(&h, &u, 2); return __half2float(h); }
  const uint32_t w = (uint32_t)u << 16; float f; memcpy(&f, &w, 4); return f;
}
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A (16x16) B (16x8) + C by the PTX ISA
// fragment layouts (g = lane/4, t = lane%4): A regs {(g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)},
// B regs {(k = 2t.., n = g), (k = 2t+8.., n = g)}, C/D {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}.
inline void emu_mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool f16) {
  const int lane = threadIdx.x & 31;
  uint32_t* x = emu_t.xbuf + 64;
  for (int i = 0; i < 4; ++i) x[lane * 6 + i] = a[i];
  x[lane * 6 + 4] = b0;
  x[lane * 6 + 5] = b1;
  emu_t.wbar->arrive_and_wait();
  auto half = [&](int ln, int reg, int hi) { return (uint16_t)(x[ln * 6 + reg] >> (16 * hi)); };
  const int g = lane / 4, t = lane % 4;
  float d[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    float s = c[i];
    for (int k = 0; k < 16; ++k) {
      const float av = emu_h2f(half((row % 8) * 4 + (k % 8) / 2, (row / 8) + 2 * (k / 8), k % 2), f16);
      const float bv = emu_h2f(half(col * 4 + (k % 8) / 2, 4 + k / 8, k % 2), f16);
      s = fmaf(av, bv, s);
    }
    d[i] = s;
  }
  emu_t.wbar->arrive_and_wait();
  for (int i = 0; i < 4; ++i) c[i] = d[i];
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (uint64_t)x | ((uint64_t)y << 32);
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xffu) << (8 * i);
  return r;
}
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
    std::vector<uint32_t> xbuf(nw * 256);
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
        emu_t.xbuf = xbuf.data() + (t / 32) * 256;
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
