// FlashAttention-2-style forward of varlen (block-diagonal, non-causal) attention. Torch-free.
//
// Grid: x = query tile + num_m_tiles * sample, y = head. Block: kWarps warps; warp w owns the
// kMTiles 16-row m-tiles starting at query row w * 16 * kMTiles of the block's kBlockM-row tile.
// Per block: the Q tile is copied to shared memory once; K and V tiles of kBlockN keys are streamed
// through one shared buffer each, the copy of V[j] overlapping S = Q K[j]^T and the copy of K[j+1]
// overlapping O += P V[j] (cp.async, FlashAttention-2's schedule). S, the online softmax (fp32,
// base 2, the scale folded into log2(e) * softmax_scale) and O (fp32) stay in registers; P is
// converted to T in registers to become the A operand of the second MMA.
//
// Shared memory (elements of T, rows padded by 8 elements = 16 bytes so that the 8 row addresses of
// every ldmatrix and every quarter-warp of 16-byte cp.async stores fall in distinct banks):
//   sQ [kBlockM][D + 8] | sK [kBlockN][D + 8] | sV [kBlockN][D + 8]
// sQ is reused, warp by warp (each warp only ever reads its own rows), to stage O for 16-byte stores.
#pragma once

#include "attention/varlen_attn_params.h"
#include "attention/varlen_attn_primitives.cuh"

namespace uniref {
namespace attn {

template <typename T_, int kHeadDim_, int kWarps_, int kMTiles_, int kBlockN_, bool kQInRegs_, int kMinBlocks_ = 1>
struct FwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kMTiles = kMTiles_;  // 16-row m-tiles per warp
  static constexpr int kBlockN = kBlockN_;
  static constexpr bool kQInRegs = kQInRegs_;  // keep Q's A fragments in registers across K tiles
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kMinBlocks = kMinBlocks_;  // __launch_bounds__: blocks per SM to fit (caps registers)
  static constexpr int kBlockM = 16 * kMTiles * kWarps;
  static constexpr int kPitch = kHeadDim + 8;
  static constexpr int kSmemElems = (kBlockM + 2 * kBlockN) * kPitch;
  static constexpr int kSmemBytes = kSmemElems * static_cast<int>(sizeof(T));
  static_assert(kHeadDim % 16 == 0 && kBlockN % 16 == 0, "tiles are multiples of 16");
  static_assert(kHeadDim >= 16 && kHeadDim <= 256, "head dim");
};

template <typename Tr>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks) varlen_attn_fwd_kernel(const VarlenAttnParams p) {
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim;
  constexpr int BM = Tr::kBlockM;
  constexpr int BN = Tr::kBlockN;
  constexpr int P = Tr::kPitch;
  constexpr int MT = Tr::kMTiles;
  constexpr int NT = BN / 8;   // n-tiles of S per m-tile
  constexpr int DT = D / 8;    // n-tiles of O per m-tile
  constexpr int KS = D / 16;   // k-steps of Q K^T
  constexpr int KV = BN / 16;  // k-steps of P V
  constexpr float kNegInf = -__builtin_huge_valf();

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;  // fragment row (and row + 8)
  const int t = lane % 4;  // fragment column pair 2t, 2t + 1

  // Which tile, head and sample; the grid was sized from max_seqlen_q (launcher).
  const int64_t num_m = (p.max_seqlen_q + BM - 1) / BM;
  const int64_t b = blockIdx.x / num_m;
  const int64_t m_block = blockIdx.x - b * num_m;
  const int h = blockIdx.y;
  if (b >= p.batch) return;
  const SeqRange qr = seq_range(p.cu_seqlens_q, b, p.total_q);
  const SeqRange kr = seq_range(p.cu_seqlens_k, b, p.total_k);
  // Whole-block exit, before any barrier. Rows of a sample longer than max_seqlen_q (invalid input
  // that only a CPU check could catch) are left unwritten but never cause an out-of-bounds access.
  if (m_block * BM >= qr.len) return;
  const int m0 = static_cast<int>(m_block * BM);  // < qr.len, fits
  const int q_rows = imin(BM, qr.len - m0);
  const int n_tiles = (kr.len + BN - 1) / BN;

  UNIREF_ATTN_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * P;
  T* sV = sK + BN * P;

  const T* q_tile = static_cast<const T*>(p.q) + (qr.start + m0) * p.q_row_stride + h * p.q_head_stride;
  const T* k_head = static_cast<const T*>(p.k) + kr.start * p.k_row_stride + h * p.k_head_stride;
  const T* v_head = static_cast<const T*>(p.v) + kr.start * p.v_row_stride + h * p.v_head_stride;

  // Prologue: Q (group 0), K[0] (group 1; empty when the sample has no keys).
  load_tile_async<BM, D, P, Tr::kThreads>(sQ, q_tile, p.q_row_stride, q_rows, tid);
  cp_async_commit();
  if (n_tiles > 0) load_tile_async<BN, D, P, Tr::kThreads>(sK, k_head, p.k_row_stride, imin(BN, kr.len), tid);
  cp_async_commit();
  cp_async_wait<1>();  // Q landed (this thread's copies) ...
  __syncthreads();     // ... and everyone's.

  // Per-lane ldmatrix base addresses (shared-space bytes); tile offsets are compile-time constants.
  constexpr int E = static_cast<int>(sizeof(T));
  const int a_off = ldsm_a_row(lane) * P + ldsm_a_col(lane);  // A order
  const int b_off = ldsm_b_row(lane) * P + ldsm_b_col(lane);  // B order
  const int warp_row0 = warp * 16 * MT;
  const uint32_t sQ_a = smem_u32(sQ) + (warp_row0 * P + a_off) * E;  // this warp's Q rows, A fragments
  const uint32_t sK_b = smem_u32(sK) + b_off * E;                    // K as B = K^T
  const uint32_t sV_a = smem_u32(sV) + a_off * E;                    // V as B (.trans)

  uint32_t qf[Tr::kQInRegs ? MT : 1][Tr::kQInRegs ? KS : 1][4];
  if constexpr (Tr::kQInRegs) {
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) ldmatrix_x4(qf[m][kk], sQ_a + (m * 16 * P + kk * 16) * E);
  }

  float acc_o[MT][DT][4];
  float row_max[MT][2];  // running max of the scaled scores, log2 units
  float row_sum[MT][2];  // running sum of 2^(s - row_max) over this thread's columns
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc_o[m][dt][c] = 0.f;
    row_max[m][0] = row_max[m][1] = kNegInf;
    row_sum[m][0] = row_sum[m][1] = 0.f;
  }
  const float scale_log2 = p.softmax_scale * kLog2e;

  for (int j = 0; j < n_tiles; ++j) {
    const int n0 = j * BN;
    cp_async_wait<0>();  // K[j] landed
    __syncthreads();     // visible to all; every warp is done with V[j-1]
    load_tile_async<BN, D, P, Tr::kThreads>(sV, v_head + static_cast<int64_t>(n0) * p.v_row_stride, p.v_row_stride,
                                            imin(BN, kr.len - n0), tid);
    cp_async_commit();

    // S = Q K[j]^T
    float s[MT][NT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) s[m][nt][c] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if constexpr (Tr::kQInRegs) {
#pragma unroll
          for (int i = 0; i < 4; ++i) a[m][i] = qf[m][kk][i];
        } else {
          ldmatrix_x4(a[m], sQ_a + (m * 16 * P + kk * 16) * E);
        }
      }
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t bk[4];  // K rows nn*16.. (keys) as B = K^T: b of n-tiles 2nn, 2nn+1
        ldmatrix_x4(bk, sK_b + (nn * 16 * P + kk * 16) * E);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          mma_16816<T>(s[m][2 * nn], a[m], bk[0], bk[1]);
          mma_16816<T>(s[m][2 * nn + 1], a[m], bk[2], bk[3]);
        }
      }
    }

    // Online softmax. Scale first (the scale may be negative), then mask keys past the sample.
    const int keys_left = kr.len - n0;  // >= 1
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {  // r = 0: row g (c = 0, 1); r = 1: row g + 8 (c = 2, 3)
        float mx = kNegInf;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int key = nt * 8 + 2 * t + e;
            float v = s[m][nt][2 * r + e] * scale_log2;
            if (BN > keys_left && key >= keys_left) v = kNegInf;
            s[m][nt][2 * r + e] = v;
            mx = fmaxf(mx, v);
          }
        mx = fmaxf(mx, shfl_xor(mx, 1));  // the 4 lanes of a quad share the row
        mx = fmaxf(mx, shfl_xor(mx, 2));
        const float m_new = fmaxf(row_max[m][r], mx);
        // A row with every score -inf so far keeps m_use = 0: no (-inf) - (-inf) = NaN below.
        const float m_use = m_new == kNegInf ? 0.f : m_new;
        const float alpha = fast_exp2(row_max[m][r] - m_use);  // 0 on the first tile (2^-inf)
        row_max[m][r] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pv = fast_exp2(s[m][nt][2 * r + e] - m_use);
            s[m][nt][2 * r + e] = pv;
            sum += pv;
          }
        row_sum[m][r] = row_sum[m][r] * alpha + sum;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          acc_o[m][dt][2 * r] *= alpha;
          acc_o[m][dt][2 * r + 1] *= alpha;
        }
      }
    }

    cp_async_wait<0>();  // V[j] landed
    __syncthreads();     // visible to all; every warp is done with K[j]
    if (j + 1 < n_tiles)
      load_tile_async<BN, D, P, Tr::kThreads>(sK, k_head + static_cast<int64_t>(n0 + BN) * p.k_row_stride,
                                              p.k_row_stride, imin(BN, kr.len - n0 - BN), tid);
    cp_async_commit();

    // O += P V[j]. The C fragments of S n-tiles 2kv, 2kv+1 are exactly the A fragment of k-step kv.
#pragma unroll
    for (int kv = 0; kv < KV; ++kv) {
      uint32_t a[MT][4];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        a[m][0] = pack2<T>(s[m][2 * kv][0], s[m][2 * kv][1]);
        a[m][1] = pack2<T>(s[m][2 * kv][2], s[m][2 * kv][3]);
        a[m][2] = pack2<T>(s[m][2 * kv + 1][0], s[m][2 * kv + 1][1]);
        a[m][3] = pack2<T>(s[m][2 * kv + 1][2], s[m][2 * kv + 1][3]);
      }
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t bv[4];  // V[kv*16.., dn*16..] (.trans): b of n-tiles 2dn, 2dn+1
        ldmatrix_x4_trans(bv, sV_a + (kv * 16 * P + dn * 16) * E);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          mma_16816<T>(acc_o[m][2 * dn], a[m], bv[0], bv[1]);
          mma_16816<T>(acc_o[m][2 * dn + 1], a[m], bv[2], bv[3]);
        }
      }
    }
  }
  // No copies are in flight here: the last iteration committed an empty group.

  // Epilogue: normalize, stage O in this warp's own rows of sQ, store 16 bytes per lane; lse.
  float* lse_head = p.lse + h * p.total_q + qr.start + m0;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[m][r];
      sum += shfl_xor(sum, 1);
      sum += shfl_xor(sum, 2);
      // No keys: sum = 0, O = 0, lse = -inf. (A NaN sum propagates.)
      const float inv = sum == 0.f ? 0.f : 1.f / sum;
      const int row = warp_row0 + m * 16 + g + 8 * r;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        *reinterpret_cast<uint32_t*>(sQ + row * P + dt * 8 + 2 * t) =
            pack2<T>(acc_o[m][dt][2 * r] * inv, acc_o[m][dt][2 * r + 1] * inv);
      if (t == 0 && row < q_rows)
        lse_head[row] = sum == 0.f ? kNegInf : (row_max[m][r] + log2f(sum)) * kLn2;
    }
  }
  __syncwarp();
  T* o_tile = static_cast<T*>(p.out) + (qr.start + m0) * p.o_row_stride + h * p.o_head_stride;
  constexpr int kChunksPerRow = D / 8;
  constexpr int kWarpChunks = 16 * MT * kChunksPerRow;
  static_assert(kWarpChunks % 32 == 0, "whole warp iterations");
#pragma unroll
  for (int i = 0; i < kWarpChunks / 32; ++i) {
    const int c = lane + 32 * i;
    const int row = warp_row0 + c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * 8;
    if (row < q_rows)
      *reinterpret_cast<uint4*>(o_tile + static_cast<int64_t>(row) * p.o_row_stride + col) =
          *reinterpret_cast<const uint4*>(sQ + row * P + col);
  }
}

}  // namespace attn
}  // namespace uniref
