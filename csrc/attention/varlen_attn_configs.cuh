// Tile configurations of the varlen attention kernels per (dtype, head dim), and their grids.
// Shared by the launchers (varlen_attn_cuda_kernels.cu) and the CPU emulation test
// (tests/cuda_emu), so that the emulator runs exactly the configurations that ship.
//
// Shared memory per block (bytes; 16-bit T):
//   forward  (kBlockM + 2 kBlockN) * (D + 8) * 2
//     D=32 : BM=128, BN=64 -> 256 * 40 * 2  = 20,480
//     D=64 : BM=128, BN=64 -> 256 * 72 * 2  = 36,864
//     D=128: BM=128, BN=32 -> 192 * 136 * 2 = 52,224
//   backward 2 BN (D+8) + 4 BM (D+8) + BN (BM+8) elements of T, + 16 BM bytes (lse, D)
//     D=32 : BN=128, BM=64 -> (10240 + 10240 + 9216) * 2 + 1024 = 60,416
//     D=64 : BN=128, BM=64 -> (18432 + 18432 + 9216) * 2 + 1024 = 93,184
//     D=128: BN=128, BM=32 -> (34816 + 17408 + 5120) * 2 + 512  = 115,200
//   all under the opt-in per-block limit of sm_80 (163 KB = 166,912 B) and sm_90 (227 KB).
#pragma once

#include <cstdint>

#include "attention/varlen_attn_bwd.cuh"
#include "attention/varlen_attn_fwd.cuh"

namespace uniref {
namespace attn {

// FwdTraits<T, D, warps, m-tiles per warp, BN, Q in registers>. Chosen so that ptxas (nvcc 13.0)
// reports no spills for sm_80 and sm_90 under __launch_bounds__(128, 1); registers per thread as
// reported (sm_80 / sm_90) are in VARLEN_ATTN_CUDA.md beside this file.
// Candidates for tuning on a GPU: D=128 with BN=64 (fewer rescales of O per key, but ptxas spills
// 8 / 40 bytes), D=32 with BN=128 (no spill, 254 / 255 registers).
template <typename T, int D>
struct FwdConfig;
template <typename T>
struct FwdConfig<T, 32> {
  using Traits = FwdTraits<T, 32, 4, 2, 64, true>;
};
template <typename T>
struct FwdConfig<T, 64> {
  using Traits = FwdTraits<T, 64, 4, 2, 64, true>;
};
template <typename T>
struct FwdConfig<T, 128> {
  using Traits = FwdTraits<T, 128, 4, 2, 32, false>;
};

// BwdTraits<T, D, warps (BN = 16 * warps), BM>. D=128 with BM=64 would halve the barriers per query
// but ptxas spills 8 / 12 bytes there; BM=32 does not spill.
template <typename T, int D>
struct BwdConfig {
  using Traits = BwdTraits<T, D, 8, (D > 64 ? 32 : 64)>;
};

static_assert(FwdConfig<__half, 32>::Traits::kSmemBytes == 20480, "documented above");
static_assert(FwdConfig<__half, 64>::Traits::kSmemBytes == 36864, "documented above");
static_assert(FwdConfig<__half, 128>::Traits::kSmemBytes == 52224, "documented above");
static_assert(BwdConfig<__half, 32>::Traits::kSmemBytes == 60416, "documented above");
static_assert(BwdConfig<__half, 64>::Traits::kSmemBytes == 93184, "documented above");
static_assert(BwdConfig<__half, 128>::Traits::kSmemBytes == 115200, "documented above");
static_assert(BwdConfig<__half, 128>::Traits::kSmemBytes <= 166912, "fits sm_80's opt-in shared memory");

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Forward grid x: query tiles of max_seqlen_q times samples; y: heads.
template <typename Tr>
inline int64_t fwd_grid_x(const VarlenAttnParams& p) {
  return ceil_div(p.max_seqlen_q, Tr::kBlockM) * p.batch;
}
// Backward main grid x: key tiles of max_seqlen_k times samples; y: heads.
template <typename Tr>
inline int64_t bwd_grid_x(const VarlenAttnParams& p) {
  return ceil_div(p.max_seqlen_k, Tr::kBlockN) * p.batch;
}
// Preprocess / convert: (row, head) items, 256 / (D / 8) per block, grid-stride.
inline int64_t rowwise_grid_x(const VarlenAttnParams& p) {
  const int64_t per_block = 256 / (p.head_dim / 8);
  const int64_t blocks = ceil_div(p.total_q * p.heads, per_block);
  return blocks < (int64_t{1} << 20) ? blocks : (int64_t{1} << 20);
}

}  // namespace attn
}  // namespace uniref
