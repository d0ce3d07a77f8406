// FlashAttention-2-style backward of varlen (block-diagonal, non-causal) attention. Torch-free.
//
// Three launches:
//  1. preprocess: D = rowsum(dO * O) in fp32, (H, Tq); zero the fp32 dq accumulator (Tq, H, D).
//  2. main: grid x = key tile + num_n_tiles * sample, y = head. Block: kWarps warps, warp w owns the
//     16 keys [16w, 16w + 16) of the block's kBlockN = 16 * kWarps keys, whose dK and dV (fp32) stay
//     in registers while the block loops over all query tiles of the sample (kBlockM rows each):
//        S^T  = K_w Q^T                    (16 x kBlockM per warp, recomputed)
//        P^T  = 2^(S^T * scale * log2e - lse * log2e)
//        dV  += P^T dO
//        dP^T = V_w dO^T
//        dS^T = P^T * (dP^T - D)
//        dK  += dS^T Q                      (times softmax_scale at the end)
//        dQ  += dS K                        (times softmax_scale in step 3; fp32 atomicAdd)
//     S^T and dP^T come out of the MMA in the C layout, which is directly the A layout that the dV
//     and dK products need (k = query). dQ needs dS with queries as rows: dS^T goes through shared
//     memory (sdS, [key][query]) and is read back transposed by ldmatrix.trans; for dQ warp w owns
//     query rows 16 * (w % (kBlockM / 16)) and a D / kColGroups slice of the head dim.
//     Q, dO, lse and D of the next query tile are prefetched (cp.async, double buffer) while the
//     current one is processed.
//  3. convert: dq = dq_accum * softmax_scale, in the input dtype.
//
// Shared memory of the main kernel (elements of T; rows padded by 8 elements = 16 bytes):
//   sK [kBlockN][D+8] | sV [kBlockN][D+8] | sQ [2][kBlockM][D+8] | sdO [2][kBlockM][D+8] |
//   sdS [kBlockN][kBlockM+8] | then fp32: sLse [2][kBlockM] | sD [2][kBlockM]
// sK and sV are reused at the end, warp by warp, to stage dK and dV for 16-byte stores.
#pragma once

#include "attention/varlen_attn_params.h"
#include "attention/varlen_attn_primitives.cuh"

namespace uniref {
namespace attn {

template <typename T_, int kHeadDim_, int kWarps_, int kBlockM_>
struct BwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = kBlockM_;       // queries per inner iteration
  static constexpr int kBlockN = 16 * kWarps;    // keys per block
  static constexpr int kPitch = kHeadDim + 8;    // sK, sV, sQ, sdO
  static constexpr int kPitchS = kBlockM + 8;    // sdS
  static constexpr int kRowGroups = kBlockM / 16;           // dQ: warps along the queries
  static constexpr int kColGroups = kWarps / kRowGroups;    // dQ: warps along the head dim
  static constexpr int kDqCols = kHeadDim / kColGroups;     // dQ columns per warp
  static constexpr int kOffV = kBlockN * kPitch;
  static constexpr int kOffQ = 2 * kBlockN * kPitch;
  static constexpr int kOffDO = kOffQ + 2 * kBlockM * kPitch;
  static constexpr int kOffDS = kOffDO + 2 * kBlockM * kPitch;
  static constexpr int kElems = kOffDS + kBlockN * kPitchS;
  static constexpr int kSmemBytes = kElems * static_cast<int>(sizeof(T)) + 4 * kBlockM * static_cast<int>(sizeof(float));
  static_assert(kHeadDim % 16 == 0 && kBlockM % 16 == 0, "tiles are multiples of 16");
  static_assert(kWarps % kRowGroups == 0, "dQ warp grid");
  static_assert(kDqCols % 16 == 0 && kDqCols * kColGroups == kHeadDim, "dQ columns per warp: whole 16-wide steps");
  static_assert(kBlockM <= kThreads, "one thread per lse / D entry");
  static_assert((kElems * sizeof(T)) % 16 == 0, "fp32 region alignment");
};

// ---------------------------------------------------------------------------------------------
// 1. D = rowsum(dO * O), zero dq_accum. G = D/8 lanes per (row, head), 16 bytes each.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(256) varlen_attn_bwd_preprocess_kernel(const VarlenAttnBwdParams bp,
                                                                         float* dq_accum, float* dsum) {
  constexpr int G = kHeadDim / 8;
  static_assert(32 % G == 0, "a (row, head) group stays inside a warp");
  constexpr int kItemsPerBlock = 256 / G;
  const VarlenAttnParams& p = bp.fwd;
  const int64_t items = p.total_q * p.heads;
  const int c = threadIdx.x % G;
  // Trip count uniform over the block (it depends on blockIdx only), so the shuffles below always
  // run with all 32 lanes.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kItemsPerBlock; base < items;
       base += static_cast<int64_t>(gridDim.x) * kItemsPerBlock) {
    const int64_t item = base + threadIdx.x / G;
    const bool ok = item < items;
    const int64_t row = ok ? item / p.heads : 0;
    const int64_t h = ok ? item - row * p.heads : 0;
    float acc = 0.f;
    if (ok) {
      const uint4 ov = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.out) + row * p.o_row_stride +
                                                       h * p.o_head_stride + c * 8);
      const uint4 dv = *reinterpret_cast<const uint4*>(static_cast<const T*>(bp.dout) + row * bp.do_row_stride +
                                                       h * bp.do_head_stride + c * 8);
      T o8[8], d8[8];
      memcpy(static_cast<void*>(o8), &ov, 16);
      memcpy(static_cast<void*>(d8), &dv, 16);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc += to_float(o8[e]) * to_float(d8[e]);
      float4* z = reinterpret_cast<float4*>(dq_accum + item * kHeadDim + c * 8);
      z[0] = make_float4(0.f, 0.f, 0.f, 0.f);
      z[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int off = G / 2; off > 0; off >>= 1) acc += shfl_xor(acc, off);
    if (ok && c == 0) dsum[h * p.total_q + row] = acc;
  }
}

// ---------------------------------------------------------------------------------------------
// 3. dq = dq_accum * softmax_scale in T.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(256) varlen_attn_bwd_convert_dq_kernel(const VarlenAttnBwdParams bp,
                                                                         const float* dq_accum) {
  constexpr int G = kHeadDim / 8;
  constexpr int kItemsPerBlock = 256 / G;
  const VarlenAttnParams& p = bp.fwd;
  const int64_t items = p.total_q * p.heads;
  const int c = threadIdx.x % G;
  const float scale = p.softmax_scale;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kItemsPerBlock; base < items;
       base += static_cast<int64_t>(gridDim.x) * kItemsPerBlock) {
    const int64_t item = base + threadIdx.x / G;
    if (item >= items) continue;
    const int64_t row = item / p.heads;
    const int64_t h = item - row * p.heads;
    const float4* a = reinterpret_cast<const float4*>(dq_accum + item * kHeadDim + c * 8);
    const float4 x = a[0], y = a[1];
    uint4 o;
    o.x = pack2<T>(x.x * scale, x.y * scale);
    o.y = pack2<T>(x.z * scale, x.w * scale);
    o.z = pack2<T>(y.x * scale, y.y * scale);
    o.w = pack2<T>(y.z * scale, y.w * scale);
    *reinterpret_cast<uint4*>(static_cast<T*>(bp.dq) + row * bp.dq_row_stride + h * bp.dq_head_stride + c * 8) = o;
  }
}

// ---------------------------------------------------------------------------------------------
// 2. Main kernel.
template <typename Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    varlen_attn_bwd_kernel(const VarlenAttnBwdParams bp, float* dq_accum, const float* dsum) {
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim;
  constexpr int BM = Tr::kBlockM;
  constexpr int BN = Tr::kBlockN;
  constexpr int P = Tr::kPitch;
  constexpr int PS = Tr::kPitchS;
  constexpr int ST = BM / 8;   // n-tiles (queries) of S^T and dP^T per warp
  constexpr int DT = D / 8;    // n-tiles of dK, dV per warp
  constexpr int KS = D / 16;   // k-steps over the head dim (S^T, dP^T)
  constexpr int KQ = BM / 16;  // k-steps over the queries (dV, dK)
  constexpr int KN = BN / 16;  // k-steps over the keys (dQ)
  constexpr int DQT = Tr::kDqCols / 8;
  const VarlenAttnParams& p = bp.fwd;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;

  const int64_t num_n = (p.max_seqlen_k + BN - 1) / BN;
  const int64_t b = blockIdx.x / num_n;
  const int64_t n_block = blockIdx.x - b * num_n;
  const int h = blockIdx.y;
  if (b >= p.batch) return;
  const SeqRange qr = seq_range(p.cu_seqlens_q, b, p.total_q);
  const SeqRange kr = seq_range(p.cu_seqlens_k, b, p.total_k);
  if (n_block * BN >= kr.len) return;  // whole block, before any barrier
  const int n0 = static_cast<int>(n_block * BN);  // < kr.len, fits
  const int k_rows = imin(BN, kr.len - n0);
  const int m_tiles = (qr.len + BM - 1) / BM;  // 0: dK = dV = 0

  UNIREF_ATTN_DYNAMIC_SMEM(smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + Tr::kOffV;
  T* sQ = sK + Tr::kOffQ;
  T* sdO = sK + Tr::kOffDO;
  T* sdS = sK + Tr::kOffDS;
  float* sLse = reinterpret_cast<float*>(smem_raw + Tr::kElems * sizeof(T));
  float* sDs = sLse + 2 * BM;

  const T* k_tile = static_cast<const T*>(p.k) + (kr.start + n0) * p.k_row_stride + h * p.k_head_stride;
  const T* v_tile = static_cast<const T*>(p.v) + (kr.start + n0) * p.v_row_stride + h * p.v_head_stride;
  const T* q_head = static_cast<const T*>(p.q) + qr.start * p.q_row_stride + h * p.q_head_stride;
  const T* do_head = static_cast<const T*>(bp.dout) + qr.start * bp.do_row_stride + h * bp.do_head_stride;
  const float* lse_head = p.lse + h * p.total_q + qr.start;
  const float* ds_head = dsum + h * p.total_q + qr.start;

  // Query tile i -> buffer `buf` (one commit group per tile, committed by the caller).
  auto load_query_tile = [&](int i, int buf) {
    const int m0 = i * BM;
    const int rows = imin(BM, qr.len - m0);
    load_tile_async<BM, D, P, Tr::kThreads>(sQ + buf * BM * P, q_head + m0 * p.q_row_stride, p.q_row_stride, rows,
                                            tid);
    load_tile_async<BM, D, P, Tr::kThreads>(sdO + buf * BM * P, do_head + m0 * bp.do_row_stride, bp.do_row_stride,
                                            rows, tid);
    load_vec_async<BM, Tr::kThreads>(sLse + buf * BM, lse_head + m0, rows, tid);
    load_vec_async<BM, Tr::kThreads>(sDs + buf * BM, ds_head + m0, rows, tid);
  };

  load_tile_async<BN, D, P, Tr::kThreads>(sK, k_tile, p.k_row_stride, k_rows, tid);
  load_tile_async<BN, D, P, Tr::kThreads>(sV, v_tile, p.v_row_stride, k_rows, tid);
  cp_async_commit();
  if (m_tiles > 0) load_query_tile(0, 0);
  cp_async_commit();

  const int kw0 = warp * 16;  // this warp's keys within the tile
  const int dq_row0 = (warp % Tr::kRowGroups) * 16;
  const int dq_col0 = (warp / Tr::kRowGroups) * Tr::kDqCols;
  // Per-lane ldmatrix base addresses (shared-space bytes); tile offsets are compile-time constants.
  constexpr int E = static_cast<int>(sizeof(T));
  const int a_off = ldsm_a_row(lane) * P + ldsm_a_col(lane);
  const int b_off = ldsm_b_row(lane) * P + ldsm_b_col(lane);
  const int b_off_ds = ldsm_b_row(lane) * PS + ldsm_b_col(lane);
  const uint32_t sK_a = smem_u32(sK) + (kw0 * P + a_off) * E;            // K_w as A
  const uint32_t sV_a = smem_u32(sV) + (kw0 * P + a_off) * E;            // V_w as A
  const uint32_t sQ_b = smem_u32(sQ) + b_off * E;                        // Q as B = Q^T (buffer 0)
  const uint32_t sQ_t = smem_u32(sQ) + a_off * E;                        // Q as B (.trans, buffer 0)
  const uint32_t sdO_b = smem_u32(sdO) + b_off * E;                      // dO as B = dO^T
  const uint32_t sdO_t = smem_u32(sdO) + a_off * E;                      // dO as B (.trans)
  const uint32_t sdS_t = smem_u32(sdS) + (dq_row0 + b_off_ds) * E;       // dS rows as A (.trans)
  const uint32_t sK_t = smem_u32(sK) + (dq_col0 + a_off) * E;            // K as B (.trans) for dQ
  const float scale_log2 = p.softmax_scale * kLog2e;

  float dk[DT][4], dv[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int c = 0; c < 4; ++c) dk[dt][c] = dv[dt][c] = 0.f;

  for (int i = 0; i < m_tiles; ++i) {
    const int buf = i & 1;
    const int m0 = i * BM;
    const int q_rows = imin(BM, qr.len - m0);
    if (i + 1 < m_tiles) {
      // Buffer buf^1 was last read in iteration i-1, before its second barrier.
      load_query_tile(i + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();  // everything but tile i+1 has landed
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // tile i visible to all; every warp is done reading sdS of iteration i-1
    const uint32_t boff = buf * BM * P * E;  // byte offset of buffer `buf`
    const float* cLse = sLse + buf * BM;
    const float* cDs = sDs + buf * BM;
    const bool partial = q_rows < BM || k_rows < BN;

    // S^T = K_w Q^T
    float s[ST][4];
#pragma unroll
    for (int nt = 0; nt < ST; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[nt][c] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, sK_a + kk * 16 * E);
#pragma unroll
      for (int nn = 0; nn < BM / 16; ++nn) {
        uint32_t bq[4];
        ldmatrix_x4(bq, sQ_b + boff + (nn * 16 * P + kk * 16) * E);
        mma_16816<T>(s[2 * nn], a, bq[0], bq[1]);
        mma_16816<T>(s[2 * nn + 1], a, bq[2], bq[3]);
      }
    }
    // P^T, zero outside the sample (padded rows are zero-filled, their lse too).
#pragma unroll
    for (int nt = 0; nt < ST; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = nt * 8 + 2 * t + e;  // query within the tile
        const float lse2 = cLse[col] * kLog2e;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int key = kw0 + g + 8 * r;
          float pv = fast_exp2(fmaf(s[nt][2 * r + e], scale_log2, -lse2));
          if (partial && (col >= q_rows || key >= k_rows)) pv = 0.f;
          s[nt][2 * r + e] = pv;
        }
      }

    // dV += P^T dO
#pragma unroll
    for (int kq = 0; kq < KQ; ++kq) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kq][0], s[2 * kq][1]);
      a[1] = pack2<T>(s[2 * kq][2], s[2 * kq][3]);
      a[2] = pack2<T>(s[2 * kq + 1][0], s[2 * kq + 1][1]);
      a[3] = pack2<T>(s[2 * kq + 1][2], s[2 * kq + 1][3]);
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t bo[4];
        ldmatrix_x4_trans(bo, sdO_t + boff + (kq * 16 * P + dn * 16) * E);
        mma_16816<T>(dv[2 * dn], a, bo[0], bo[1]);
        mma_16816<T>(dv[2 * dn + 1], a, bo[2], bo[3]);
      }
    }

    // dP^T = V_w dO^T
    float dp[ST][4];
#pragma unroll
    for (int nt = 0; nt < ST; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) dp[nt][c] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, sV_a + kk * 16 * E);
#pragma unroll
      for (int nn = 0; nn < BM / 16; ++nn) {
        uint32_t bo[4];
        ldmatrix_x4(bo, sdO_b + boff + (nn * 16 * P + kk * 16) * E);
        mma_16816<T>(dp[2 * nn], a, bo[0], bo[1]);
        mma_16816<T>(dp[2 * nn + 1], a, bo[2], bo[3]);
      }
    }
    // dS^T = P^T (dP^T - D), in place of dP^T
#pragma unroll
    for (int nt = 0; nt < ST; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float dsum_q = cDs[nt * 8 + 2 * t + e];
#pragma unroll
        for (int r = 0; r < 2; ++r) dp[nt][2 * r + e] = s[nt][2 * r + e] * (dp[nt][2 * r + e] - dsum_q);
      }

    // dK += dS^T Q
#pragma unroll
    for (int kq = 0; kq < KQ; ++kq) {
      uint32_t a[4];
      a[0] = pack2<T>(dp[2 * kq][0], dp[2 * kq][1]);
      a[1] = pack2<T>(dp[2 * kq][2], dp[2 * kq][3]);
      a[2] = pack2<T>(dp[2 * kq + 1][0], dp[2 * kq + 1][1]);
      a[3] = pack2<T>(dp[2 * kq + 1][2], dp[2 * kq + 1][3]);
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t bq[4];
        ldmatrix_x4_trans(bq, sQ_t + boff + (kq * 16 * P + dn * 16) * E);
        mma_16816<T>(dk[2 * dn], a, bq[0], bq[1]);
        mma_16816<T>(dk[2 * dn + 1], a, bq[2], bq[3]);
      }
    }

    // dS^T -> sdS[key][query]
#pragma unroll
    for (int nt = 0; nt < ST; ++nt)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        *reinterpret_cast<uint32_t*>(sdS + (kw0 + g + 8 * r) * PS + nt * 8 + 2 * t) =
            pack2<T>(dp[nt][2 * r], dp[nt][2 * r + 1]);
    __syncthreads();  // sdS complete; also: every warp is done reading buffer `buf`

    // dQ[dq_row0.., dq_col0..] += dS K over this block's keys (K rows past the sample are zero).
    float dq[DQT][4];
#pragma unroll
    for (int dt = 0; dt < DQT; ++dt)
#pragma unroll
      for (int c = 0; c < 4; ++c) dq[dt][c] = 0.f;
#pragma unroll
    for (int kn = 0; kn < KN; ++kn) {
      uint32_t a[4];  // dS[dq_row0.., kn*16..] from sdS^T (.trans, B order)
      ldmatrix_x4_trans(a, sdS_t + kn * 16 * PS * E);
#pragma unroll
      for (int dn = 0; dn < DQT / 2; ++dn) {
        uint32_t bk[4];
        ldmatrix_x4_trans(bk, sK_t + (kn * 16 * P + dn * 16) * E);
        mma_16816<T>(dq[2 * dn], a, bk[0], bk[1]);
        mma_16816<T>(dq[2 * dn + 1], a, bk[2], bk[3]);
      }
    }
    float* dq_tile = dq_accum + ((qr.start + m0) * p.heads + h) * D;
    const int64_t dq_row_stride = p.heads * D;
#pragma unroll
    for (int dt = 0; dt < DQT; ++dt)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int row = dq_row0 + g + 8 * (c >> 1);
        const int col = dq_col0 + dt * 8 + 2 * t + (c & 1);
        if (row < q_rows) atomicAdd(dq_tile + row * dq_row_stride + col, dq[dt][c]);
      }
  }

  // Epilogue: stage dK * scale and dV in this warp's own rows of sK and sV, 16-byte stores.
  cp_async_wait<0>();  // (nothing in flight unless m_tiles == 0: then K and V may still be landing)
  __syncthreads();     // every warp is done reading sK (dQ of the last iteration)
  const float scale = p.softmax_scale;
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = kw0 + g + 8 * r;
      *reinterpret_cast<uint32_t*>(sK + row * P + dt * 8 + 2 * t) =
          pack2<T>(dk[dt][2 * r] * scale, dk[dt][2 * r + 1] * scale);
      *reinterpret_cast<uint32_t*>(sV + row * P + dt * 8 + 2 * t) = pack2<T>(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  __syncwarp();
  T* dk_tile = static_cast<T*>(bp.dk) + (kr.start + n0) * bp.dk_row_stride + h * bp.dk_head_stride;
  T* dv_tile = static_cast<T*>(bp.dv) + (kr.start + n0) * bp.dv_row_stride + h * bp.dv_head_stride;
  constexpr int kChunksPerRow = D / 8;
  constexpr int kWarpChunks = 16 * kChunksPerRow;
  static_assert(kWarpChunks % 32 == 0, "whole warp iterations");
#pragma unroll
  for (int it = 0; it < kWarpChunks / 32; ++it) {
    const int c = lane + 32 * it;
    const int row = kw0 + c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * 8;
    if (row < k_rows) {
      *reinterpret_cast<uint4*>(dk_tile + static_cast<int64_t>(row) * bp.dk_row_stride + col) =
          *reinterpret_cast<const uint4*>(sK + row * P + col);
      *reinterpret_cast<uint4*>(dv_tile + static_cast<int64_t>(row) * bp.dv_row_stride + col) =
          *reinterpret_cast<const uint4*>(sV + row * P + col);
    }
  }
}

}  // namespace attn
}  // namespace uniref
