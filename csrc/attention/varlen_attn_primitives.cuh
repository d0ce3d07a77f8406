// Warp-level building blocks of the varlen attention kernels (sm_80+): tensor-core MMA, ldmatrix,
// cp.async, quad shuffles and small conversions. Torch-free.
//
// Every kernel touches the hardware only through the functions below, so that the same kernel
// source also compiles for the host against tests/cuda_emu/attn_emulator.h (UNIREF_ATTN_EMULATE),
// which gives these functions their PTX-documented semantics on the CPU; tests/cuda_emu runs the
// kernels that way, on machines without a GPU.
//
// Fragment layouts of mma.sync.m16n8k16 (PTX ISA "Matrix Fragments for mma.m16n8k16", the same as
// CuTe's SM80_16x8x16 traits). Lane l: g = l / 4 ("group"), t = l % 4 ("thread in group").
//   A (16x16, row-major), 4 x b32 of two 16-bit values, low half = lower column:
//     a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..2t+1]   a[2] = A[g][2t+8..2t+9]   a[3] = A[g+8][2t+8..2t+9]
//   B (16x8, "col": B[k][n]), 2 x b32:
//     b[0] = B[2t..2t+1][g]   b[1] = B[2t+8..2t+9][g]
//   C, D (16x8, fp32): c[0] = C[g][2t]  c[1] = C[g][2t+1]  c[2] = C[g+8][2t]  c[3] = C[g+8][2t+1]
// ldmatrix.m8n8.x4.b16: lanes 8i..8i+7 give the 8 row addresses (16 bytes each) of matrix i; lane l
// receives in r[i] the elements (row l/4, cols 2(l%4)..+1) of matrix i, or with .trans the elements
// (rows 2(l%4)..+1, col l/4) -- the transposed matrix.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#ifdef UNIREF_ATTN_EMULATE
#include "attn_emulator.h"  // host emulation of the primitives (tests/cuda_emu)
#define UNIREF_ATTN_DYNAMIC_SMEM(name) unsigned char* name = ::uniref_emu::smem_base()
#else
#include <cuda_runtime.h>
#define UNIREF_ATTN_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace uniref {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Two floats -> one b32 of two T (round to nearest even), `lo` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    memcpy(&r, &v, 4);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    memcpy(&r, &v, 4);
  }
  return r;
}

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __bfloat162float(x);
  else
    return __half2float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __float2bfloat16_rn(x);
  else
    return __float2half_rn(x);
}

#ifndef UNIREF_ATTN_EMULATE

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// d += A * B for one m16n8k16 tile, fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// ldmatrix takes a shared-space byte address (smem_u32), so that a loop over tiles becomes one
// base register plus immediate offsets. The "memory" clobbers keep the compiler from moving
// shared-memory reads across the plain stores and barriers that order them.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr)
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr)
               : "memory");
}

// 16-byte asynchronous copy global -> shared. When !pred nothing is read and the 16 bytes are
// zero-filled (src-size 0); `gmem` must still be a valid address.
__device__ __forceinline__ void cp_async_16(uint32_t smem_addr, const void* gmem, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem), "r"(src_bytes)
               : "memory");
}

// 4-byte variant (lse and D vectors), same zero-fill rule.
__device__ __forceinline__ void cp_async_4(uint32_t smem_addr, const void* gmem, bool pred) {
  const int src_bytes = pred ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr), "l"(gmem), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

// 2^x (MUFU.EX2; 2^-inf = +0, subnormal results flushed to 0, relative error ~2^-22).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

#endif  // !UNIREF_ATTN_EMULATE

// Per-lane offsets (row, col) into a row-major shared tile for ldmatrix.x4 reading the 16x16 block
// at (r0, c0), in two matrix orders (see the layout notes at the top):
//  - "A order": matrices (r0,c0) (r0+8,c0) (r0,c0+8) (r0+8,c0+8). Gives the A fragment of a
//    row-major [m][k] tile (non-trans), or, with .trans on a [k][n] tile, r[0..1] = b[0..1] of the
//    n-tile c0 and r[2..3] = b[0..1] of the n-tile c0+8.
//  - "B order": matrices (r0,c0) (r0,c0+8) (r0+8,c0) (r0+8,c0+8). Gives, non-trans on an [n][k]
//    tile, r[0..1] = b[0..1] of the n-tile r0 and r[2..3] of the n-tile r0+8; or, with .trans on a
//    [k][m] tile, the A fragment of its transpose (a[i] for the matrix [m][k]).
__device__ __forceinline__ int ldsm_a_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
__device__ __forceinline__ int ldsm_a_col(int lane) { return (lane >> 4) * 8; }
__device__ __forceinline__ int ldsm_b_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }
__device__ __forceinline__ int ldsm_b_col(int lane) { return ((lane >> 3) & 1) * 8; }

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// One sample's rows [start, start + len), clamped into [0, total) whatever cu_seqlens holds.
struct SeqRange {
  int64_t start;
  int len;
};

__device__ __forceinline__ SeqRange seq_range(const int32_t* cu, int64_t b, int64_t total) {
  int64_t s = cu[b], e = cu[b + 1];
  s = s < 0 ? 0 : (s > total ? total : s);
  e = e < s ? s : (e > total ? total : e);
  return {s, static_cast<int>(e - s)};
}

// Copies a kRows x kD tile (row stride `row_stride` elements, 16-byte aligned rows) into shared
// memory with a pitch of kPitch elements, 16 bytes per cp.async; rows >= valid_rows are zero-filled
// without being read. Row 0 of `gmem` must be a valid row (callers only load tiles with valid_rows >= 1).
// Thread tid copies the 16-byte column (tid % (kD/8)) of rows tid / (kD/8) + i * kThreads / (kD/8):
// one 64-bit source pointer and one step per thread, few registers kept across the K/V loop.
template <int kRows, int kD, int kPitch, int kThreads, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t row_stride, int valid_rows, int tid) {
  constexpr int kChunksPerRow = kD / 8;
  static_assert(kThreads % kChunksPerRow == 0, "whole rows per pass");
  constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static_assert(kRows % kRowsPerPass == 0, "whole passes");
  const int row0 = tid / kChunksPerRow;
  const int col = (tid % kChunksPerRow) * 8;
  const T* src = gmem + row0 * row_stride + col;
  const int64_t step = kRowsPerPass * row_stride;
  const uint32_t dst = smem_u32(smem + row0 * kPitch + col);
#pragma unroll
  for (int i = 0; i < kRows / kRowsPerPass; ++i) {
    const bool ok = row0 + i * kRowsPerPass < valid_rows;
    cp_async_16(dst + i * kRowsPerPass * kPitch * static_cast<int>(sizeof(T)), ok ? src + i * step : gmem, ok);
  }
}

// Copies kRows floats (a slice of lse or D) into shared memory, 4 bytes per cp.async; entries
// >= valid are zero-filled. gmem[0] must be valid.
template <int kRows, int kThreads>
__device__ __forceinline__ void load_vec_async(float* smem, const float* gmem, int valid, int tid) {
  static_assert(kRows <= kThreads, "one entry per thread");
  if (tid < kRows) {
    const bool ok = tid < valid;
    cp_async_4(smem_u32(smem + tid), ok ? gmem + tid : gmem, ok);
  }
}

}  // namespace attn
}  // namespace uniref
