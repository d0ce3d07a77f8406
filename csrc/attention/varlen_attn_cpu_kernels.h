// CPU kernels of uniref::varlen_attn_fwd / varlen_attn_bwd (schemas in csrc/ops.cpp, argument checks in
// varlen_attn_checks.h, bindings in varlen_attn_cpu.cpp): block-diagonal (per-sample), non-causal attention
// over packed sequences, FlashAttention-2 style.
//
// Forward. One work item = (sample, head, block of kBlockQ queries). The item keeps its queries' scaled
// Q^T, output O^T (D x kBlockQ) and running max / sum, and streams the sample's keys in tiles of kBlockK:
//   S^T = K Q^T,  online softmax over the tile's keys,  O^T = alpha * O^T + V^T P^T.
// Only one kBlockK x kBlockQ score tile exists at a time. lse = log(sum exp(scale * q.k)) per query row.
// Backward. Recomputes P from the saved lse. One work item = (sample, head, block of kBlockK keys); it owns
// dK and dV of its keys and streams the sample's query blocks:
//   P^T = exp(scale * K Q^T - lse), dP^T = V dO^T, dS^T = P^T * (dP^T - Dq) * scale, Dq = rowsum(dO * O),
//   dV += P^T dO,  dK += dS^T Q,  dQ += dS K.
// dQ rows receive contributions from every key block of their sample; they are added in key block order
// (each (head, query block) passes its turn from key block to key block), so the gradients are bitwise
// the same at every thread count.
// A prepass lays out each (head, query block)'s scaled Q^T, dO^T, lse and Dq once for all the key blocks
// that read them: a workspace of ~2x q's size in fp32 (~4x for fp16/bf16 or a head_dim that is not a
// multiple of the vector width, which also keep Q and dO rows converted).
//
// Zero-length samples: a sample with no keys gives out = 0 and lse = -inf on its query rows (the sum of an
// empty set of exponentials is 0) and dq = 0; a sample with no queries gives dk = dv = 0.
//
// Accumulation is fp32 for fp32/fp16/bf16 inputs and fp64 for fp64 inputs (gradcheck). lse is fp32 always
// (the schema's), so fp64 gradients carry its rounding: ~1e-7 relative. Every product sums at most kChunk
// terms in registers before adding them to its output (see micro_kernel), which keeps fp32 results within
// 2x (forward) / 3x (backward) of PyTorch's own attention error at any length. Nothing depends on the
// thread count or schedule: the same inputs give bitwise the same outputs and gradients.
//
// Vectorization. Every product (2 in the forward, 5 in the backward) is laid out so that the SIMD lanes run
// over a padded block dimension (queries in S, P, dP, dS, O^T; head_dim rounded up to the vector width in
// dV, dK, dQ) while the other operand is broadcast one scalar at a time. So all of them are one
// register-blocked micro-kernel, C[MR x NV vectors] += A[MR x K] B[K x NV vectors], and K and V tiles are
// read in their natural row layout, never transposed. The micro-kernel uses GCC/Clang vector extensions
// rather than plain loops: the auto-vectorizer keeps such a loop's accumulator array in memory (measured
// on this project's AVX-512 machine: 12 GFLOP/s per core for the plain loop, 250 with vector types); the
// width follows the target this file is compiled for (AVX-512, AVX2 or SSE, all tested): it is compiled
// once per target (varlen_attn_cpu.cpp: the build's own; varlen_attn_cpu_simd.cpp: x86-64-v3 and -v4), and
// the widest one the CPU runs is chosen at import (varlen_attn_cpu_dispatch.h).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "attention/varlen_attn_params.h"

namespace uniref {
// Each file that includes this gets its own copy of the kernels, compiled for its own target.
namespace {

// ---- SIMD primitives ---------------------------------------------------------------------------------

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kVecRegs = 32;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
constexpr int kVecRegs = 16;
#else
constexpr int kVecBytes = 16;
constexpr int kVecRegs = 16;
#endif

template <typename Acc>
struct VecOf {
  typedef Acc type __attribute__((vector_size(kVecBytes)));
};
template <typename Acc>
using Vec = typename VecOf<Acc>::type;
template <typename Acc>
constexpr int kLanes = kVecBytes / sizeof(Acc);

template <typename Acc>
inline Vec<Acc> splat(Acc x) {
  return Vec<Acc>{} + x;
}
template <typename Acc>
inline Vec<Acc> load(const Acc* p) {
  Vec<Acc> v;
  std::memcpy(&v, p, sizeof(v));  // an unaligned vector load
  return v;
}
template <typename Acc>
inline void store(Acc* p, Vec<Acc> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename V>  // V = Vec<Acc> (not deducible through the alias)
inline V vmax(V a, V b) {
  return a > b ? a : b;
}

// 2^x per lane. float: Cephes' exp2f polynomial on the fraction in [-0.5, 0.5] (max relative error
// 7.4e-8 measured), the integer part added to the exponent bits; x <= -127 (masked or hopeless scores,
// -inf included) gives exactly 0, NaN stays NaN. double (gradcheck only): the libm function per lane.
inline Vec<float> exp2v(Vec<float> x) {
  using VI = int32_t __attribute__((vector_size(kVecBytes)));
  const Vec<float> lo = splat(-127.f);
  x = x < lo ? lo : x;
  const Vec<float> magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const Vec<float> r = x + magic;
  const Vec<float> f = x - (r - magic);
  Vec<float> p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const VI scale = ((VI)r - (VI)magic + 127) << 23;  // 2^round(x) as float bits; 0 for round(x) = -127
  return p * (Vec<float>)scale;
}
inline Vec<double> exp2v(Vec<double> x) {
  for (int i = 0; i < kLanes<double>; ++i) x[i] = std::exp2(x[i]);
  return x;
}

// ---- the micro-kernel and its driver -------------------------------------------------------------------

// Products are summed in registers over at most kChunk terms of the contraction, then added to C: a
// two-level sum. Its rounding error grows with kChunk + kc / kChunk terms rather than kc (one sequential
// sum over a head dim of 128 or 1024 keys put the kernel outside the error bound of PyTorch's own
// attention), and the final add costs one load and store of the micro-tile per chunk.
constexpr int64_t kChunk = 32;

// C (MR rows x NV vectors, row stride ldc) = or += A B, where A(r, kk) = a[r * a_rs + kk * a_cs] is
// broadcast a scalar at a time and B rows are NV contiguous vectors (row stride ldb). Every element is
// C + sum over chunks of (sum over the chunk's kk of A B, in kk order): `chunked_dot` below repeats it.
template <typename Acc, int MR, int NV>
inline void micro_kernel(int64_t kc, const Acc* a, int64_t a_rs, int64_t a_cs, const Acc* b, int64_t ldb, Acc* c,
                         int64_t ldc, bool accumulate) {
  constexpr int W = kLanes<Acc>;
  int64_t k0 = 0;
  do {
    const int64_t k1 = std::min(kc, k0 + kChunk);
    Vec<Acc> acc[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = Vec<Acc>{};
    for (int64_t kk = k0; kk < k1; ++kk) {
      Vec<Acc> bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = load(b + kk * ldb + v * W);
      const Acc* ak = a + kk * a_cs;
      for (int r = 0; r < MR; ++r) {
        const Acc ar = ak[r * a_rs];
        for (int v = 0; v < NV; ++v) acc[r][v] += ar * bv[v];
      }
    }
    const bool add = accumulate || k0 > 0;
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) {
        Acc* cp = c + r * ldc + v * W;
        store(cp, add ? load(cp) + acc[r][v] : acc[r][v]);
      }
    k0 = k1;
  } while (k0 < kc);
}

// sum_i a[i] b[i] rounded exactly as one element of micro_kernel's product (accumulate = false). The
// backward's Dq = dO . O goes through it so that it rounds as dP = dO . V does: where O equals a row of V
// (a query with one key), dP - Dq is then exactly 0, as it is in exact arithmetic.
template <typename Acc, typename T>
Acc chunked_dot(const T* a, const T* b, int64_t n) {
  Acc total = 0;
  int64_t k0 = 0;
  do {
    const int64_t k1 = std::min(n, k0 + kChunk);
    Acc acc = 0;
    for (int64_t i = k0; i < k1; ++i) acc += static_cast<Acc>(a[i]) * static_cast<Acc>(b[i]);
    total = k0 > 0 ? total + acc : acc;
    k0 = k1;
  } while (k0 < n);
  return total;
}

// Rows per micro-tile: as many accumulators as the register file holds next to the B vectors.
template <int NV>
constexpr int rows_per_tile() {
  return std::min(12, (kVecRegs - NV - 2) / NV);
}

template <typename Acc, int NV>
void gemm_panel(int64_t m, int64_t kc, const Acc* a, int64_t a_rs, int64_t a_cs, const Acc* b, int64_t ldb, Acc* c,
                int64_t ldc, bool accumulate) {
  constexpr int MR = rows_per_tile<NV>();
  int64_t r = 0;
  auto tile = [&](auto rows) {  // rows: std::integral_constant, the micro-tile's row count
    micro_kernel<Acc, decltype(rows)::value, NV>(kc, a + r * a_rs, a_rs, a_cs, b, ldb, c + r * ldc, ldc, accumulate);
    r += decltype(rows)::value;
  };
  while (r + MR <= m) tile(std::integral_constant<int, MR>{});
  // The remaining < MR rows in tiles of 8, 4, 2, 1 (only those smaller than MR are instantiated).
  if constexpr (MR > 8)
    if (m - r >= 8) tile(std::integral_constant<int, 8>{});
  if constexpr (MR > 4)
    if (m - r >= 4) tile(std::integral_constant<int, 4>{});
  if constexpr (MR > 2)
    if (m - r >= 2) tile(std::integral_constant<int, 2>{});
  if (m - r >= 1) tile(std::integral_constant<int, 1>{});
}

// C (m x n) = or += A (m x kc) B (kc x n); n is a multiple of the vector width (callers pad).
template <typename Acc>
void gemm(int64_t m, int64_t n, int64_t kc, const Acc* a, int64_t a_rs, int64_t a_cs, const Acc* b, int64_t ldb,
          Acc* c, int64_t ldc, bool accumulate) {
  constexpr int W = kLanes<Acc>;
  constexpr int kWide = kVecRegs >= 32 ? 4 : 2;
  for (int64_t col = 0; col < n;) {
    const int64_t vectors = (n - col) / W;
    if (vectors >= kWide) {
      gemm_panel<Acc, kWide>(m, kc, a, a_rs, a_cs, b + col, ldb, c + col, ldc, accumulate);
      col += kWide * W;
    } else if (vectors >= 2) {
      gemm_panel<Acc, 2>(m, kc, a, a_rs, a_cs, b + col, ldb, c + col, ldc, accumulate);
      col += 2 * W;
    } else {
      gemm_panel<Acc, 1>(m, kc, a, a_rs, a_cs, b + col, ldb, c + col, ldc, accumulate);
      col += W;
    }
  }
}

// ---- tiles and scheduling ------------------------------------------------------------------------------

constexpr int64_t kBlockQ = 64;  // queries per block: the lane dimension of the score tiles
constexpr int64_t kBlockK = 64;  // keys per tile

template <typename Acc>
int64_t padded_head_dim(int64_t d) {
  return (d + kLanes<Acc> - 1) / kLanes<Acc> * kLanes<Acc>;
}

// Rows [0, n) of a (rows, D) view with row stride `rs` as Acc rows of `width` >= D elements: the input
// itself when it already is (an fp32/fp64 view whose head_dim needs no padding), else converted into
// `scratch` with zeros in columns [D, width). Returns the rows and sets `ld` to their stride.
template <typename Acc, typename T>
const Acc* rows_as_acc(const T* src, int64_t rs, int64_t n, int64_t d, int64_t width, Acc* scratch, int64_t& ld) {
  if constexpr (std::is_same_v<T, Acc>) {
    if (width == d) {
      ld = rs;
      return src;
    }
  }
  for (int64_t r = 0; r < n; ++r) {
    const T* s = src + r * rs;
    Acc* o = scratch + r * width;
    for (int64_t c = 0; c < d; ++c) o[c] = static_cast<Acc>(s[c]);
    for (int64_t c = d; c < width; ++c) o[c] = Acc(0);
  }
  ld = width;
  return scratch;
}

// Rows [0, n) of a (rows, D) view, transposed into dst (D x kBlockQ) times `mul`; columns [n, kBlockQ) = 0.
template <typename Acc, typename T>
void transpose_block(const T* src, int64_t rs, int64_t n, int64_t d, Acc mul, Acc* dst) {
  for (int64_t c = 0; c < d; ++c) std::fill(dst + c * kBlockQ + n, dst + (c + 1) * kBlockQ, Acc(0));
  for (int64_t r = 0; r < n; ++r) {
    const T* s = src + r * rs;
    for (int64_t c = 0; c < d; ++c) dst[c * kBlockQ + r] = static_cast<Acc>(s[c]) * mul;
  }
}

// A contiguous run of one sample's rows: [begin, end).
struct RowBlock {
  int64_t sample, begin, end;
};

// Splits every sample's rows (cu_seqlens offsets) into blocks of `size`; first[b] = index of sample b's
// first block, first[B] = number of blocks.
std::vector<RowBlock> row_blocks(const int32_t* cu, int64_t batch, int64_t size, std::vector<int64_t>& first) {
  std::vector<RowBlock> blocks;
  first.assign(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    first[b] = static_cast<int64_t>(blocks.size());
    for (int64_t r = cu[b]; r < cu[b + 1]; r += size) blocks.push_back({b, r, std::min<int64_t>(r + size, cu[b + 1])});
  }
  first[batch] = static_cast<int64_t>(blocks.size());
  return blocks;
}

// Runs item(index, scratch) for every index in [0, n) on all intra-op threads, costliest first. Threads
// take the next index from a shared counter, so items of unequal cost (samples of different lengths, a
// machine shared with other work) keep every thread busy until the end; the stable sort keeps equal-cost
// items (one sample's heads and blocks) in order, so consecutive items reuse the same K/V in cache.
// make_scratch() builds one scratch object per thread.
template <typename MakeScratch, typename Item>
void run_costliest_first(const std::vector<int64_t>& costs, MakeScratch make_scratch, Item item) {
  const int64_t n = static_cast<int64_t>(costs.size());
  if (n == 0) return;
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return costs[x] > costs[y]; });
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) item(order[i], scratch);
  });
}

// Hands a shared accumulator to its contributors in a fixed order (0, 1, 2, ...), so that the sum comes
// out bitwise the same at every thread count and schedule. Contributor i waits until i - 1 has added.
struct Turn {
  std::atomic<int64_t> next{0};
  void wait_for(int64_t i) const {
    // Short spins first (the previous contributor is usually a few microseconds away), then yield: the
    // thread it waits on may be descheduled on a loaded machine, and must get the core.
    for (int spins = 0; next.load(std::memory_order_acquire) != i; ++spins)
      if (spins >= 64) std::this_thread::yield();
  }
  void done(int64_t i) { next.store(i + 1, std::memory_order_release); }
};

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

template <typename T>
using AccOf = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ---- forward -------------------------------------------------------------------------------------------

template <typename Acc>
struct ForwardScratch {
  std::vector<Acc> qt, ot, st, k, v, m, l, alpha;
  ForwardScratch(int64_t d, bool convert)
      : qt(d * kBlockQ), ot(d * kBlockQ), st(kBlockK * kBlockQ), k(convert ? kBlockK * d : 0),
        v(convert ? kBlockK * d : 0), m(kBlockQ), l(kBlockQ), alpha(kBlockQ) {}
};

// Online-softmax update of one score tile st (kn x kBlockQ, scores in log2 units) in place into P^T;
// m, l: running max and sum per query column; alpha: the factor the old output must be scaled by.
template <typename Acc>
void softmax_tile(Acc* st, int64_t kn, Acc* m, Acc* l, Acc* alpha) {
  constexpr int W = kLanes<Acc>;
  constexpr int NV = kBlockQ / W;
  Vec<Acc> mx[NV], sum[NV];
  for (int c = 0; c < NV; ++c) mx[c] = load(m + c * W);
  for (int64_t j = 0; j < kn; ++j)
    for (int c = 0; c < NV; ++c) mx[c] = vmax(mx[c], load(st + j * kBlockQ + c * W));
  for (int c = 0; c < NV; ++c) sum[c] = Vec<Acc>{};
  for (int64_t j = 0; j < kn; ++j)
    for (int c = 0; c < NV; ++c) {
      const Vec<Acc> p = exp2v(load(st + j * kBlockQ + c * W) - mx[c]);
      store(st + j * kBlockQ + c * W, p);
      sum[c] += p;
    }
  for (int c = 0; c < NV; ++c) {
    const Vec<Acc> a = exp2v(load(m + c * W) - mx[c]);  // 0 on the first tile (m = -inf)
    store(alpha + c * W, a);
    store(l + c * W, load(l + c * W) * a + sum[c]);
    store(m + c * W, mx[c]);
  }
}

template <typename T>
void forward_kernel(const VarlenAttnParams& p, double softmax_scale) {
  using Acc = AccOf<T>;
  constexpr int W = kLanes<Acc>;
  const int64_t D = p.head_dim, H = p.heads;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  std::vector<int64_t> first;
  const std::vector<RowBlock> qblocks = row_blocks(p.cu_seqlens_q, p.batch, kBlockQ, first);
  const int64_t nqb = static_cast<int64_t>(qblocks.size());
  // Item = head * nqb + query block; its cost is its sample's key count (+1: writing an empty sample's rows).
  std::vector<int64_t> costs(H * nqb);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t g = 0; g < nqb; ++g) {
      const int64_t b = qblocks[g].sample;
      costs[h * nqb + g] = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b] + 1;
    }
  const Acc q_mul = static_cast<Acc>(softmax_scale * kLog2e);  // scores in log2 units: exp2 instead of exp
  constexpr bool kConvert = !std::is_same_v<T, Acc>;

  run_costliest_first(
      costs, [&] { return ForwardScratch<Acc>(D, kConvert); },
      [&](int64_t item, ForwardScratch<Acc>& s) {
        const int64_t h = item / nqb;
        const RowBlock& blk = qblocks[item % nqb];
        const int64_t qn = blk.end - blk.begin;
        const int64_t k_begin = p.cu_seqlens_k[blk.sample], k_end = p.cu_seqlens_k[blk.sample + 1];
        transpose_block(q + blk.begin * p.q_row_stride + h * p.q_head_stride, p.q_row_stride, qn, D, q_mul,
                        s.qt.data());
        std::fill(s.ot.begin(), s.ot.end(), Acc(0));
        std::fill(s.m.begin(), s.m.end(), -std::numeric_limits<Acc>::infinity());
        std::fill(s.l.begin(), s.l.end(), Acc(0));
        for (int64_t k0 = k_begin; k0 < k_end; k0 += kBlockK) {
          const int64_t kn = std::min(kBlockK, k_end - k0);
          int64_t ldk, ldv;
          const Acc* kt = rows_as_acc<Acc>(k + k0 * p.k_row_stride + h * p.k_head_stride, p.k_row_stride, kn, D, D,
                                           s.k.data(), ldk);
          const Acc* vt = rows_as_acc<Acc>(v + k0 * p.v_row_stride + h * p.v_head_stride, p.v_row_stride, kn, D, D,
                                           s.v.data(), ldv);
          // S^T (kn x kBlockQ) = K Q^T
          gemm<Acc>(kn, kBlockQ, D, kt, ldk, 1, s.qt.data(), kBlockQ, s.st.data(), kBlockQ, false);
          softmax_tile(s.st.data(), kn, s.m.data(), s.l.data(), s.alpha.data());
          for (int64_t d = 0; d < D; ++d)
            for (int c = 0; c < kBlockQ / W; ++c) {
              Acc* o = s.ot.data() + d * kBlockQ + c * W;
              store(o, load(o) * load(s.alpha.data() + c * W));
            }
          // O^T (D x kBlockQ) += V^T P^T
          gemm<Acc>(D, kBlockQ, kn, vt, 1, ldv, s.st.data(), kBlockQ, s.ot.data(), kBlockQ, true);
        }
        float* lse = p.lse + h * p.total_q + blk.begin;
        for (int64_t i = 0; i < qn; ++i) {
          const Acc l = s.l[i];
          const Acc inv = l > 0 ? Acc(1) / l : Acc(0);
          lse[i] = l > 0 ? static_cast<float>((s.m[i] + std::log2(l)) * kLn2) : -std::numeric_limits<float>::infinity();
          T* o = out + (blk.begin + i) * p.o_row_stride + h * p.o_head_stride;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(s.ot[d * kBlockQ + i] * inv);
        }
      });
}

// ---- backward ------------------------------------------------------------------------------------------

template <typename Acc>
struct BackwardScratch {
  std::vector<Acc> st, dpt, k, v, dk, dv;
  BackwardScratch(int64_t dp)
      : st(kBlockK * kBlockQ), dpt(kBlockK * kBlockQ), k(kBlockK * dp), v(kBlockK * dp), dk(kBlockK * dp),
        dv(kBlockK * dp) {}
};

template <typename T>
void backward_kernel(const VarlenAttnBwdParams& bp, double softmax_scale) {
  using Acc = AccOf<T>;
  const VarlenAttnParams& p = bp.fwd;
  const int64_t D = p.head_dim, H = p.heads;
  const int64_t Dp = padded_head_dim<Acc>(D);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* o = static_cast<const T*>(p.out);
  const T* dout = static_cast<const T*>(bp.dout);
  T* dq = static_cast<T*>(bp.dq);
  T* dk = static_cast<T*>(bp.dk);
  T* dv = static_cast<T*>(bp.dv);
  const Acc scale = static_cast<Acc>(softmax_scale);
  const Acc q_mul = static_cast<Acc>(softmax_scale * kLog2e);

  std::vector<int64_t> qfirst, kfirst;
  const std::vector<RowBlock> qblocks = row_blocks(p.cu_seqlens_q, p.batch, kBlockQ, qfirst);
  const std::vector<RowBlock> kblocks = row_blocks(p.cu_seqlens_k, p.batch, kBlockK, kfirst);
  const int64_t nqb = static_cast<int64_t>(qblocks.size()), nkb = static_cast<int64_t>(kblocks.size());

  // 1. Per (head, query block), once for all the key blocks that will read it: Q^T scaled to log2 units,
  // dO^T, lse in log2 units (+inf on padding columns, so their P is 0), Dq = rowsum(dO * O), and Q and dO
  // as Acc rows of Dp columns when the inputs are not already that.
  constexpr bool kDirectRows = std::is_same_v<T, Acc>;
  const bool rows_direct = kDirectRows && Dp == D;
  const int64_t tile = D * kBlockQ;
  // Not value-initialized (a serial pass over several MB): the loop below writes every element read later.
  auto workspace = [](int64_t n) { return std::unique_ptr<Acc[]>(new Acc[n]); };
  auto qt = workspace(H * nqb * tile), dot = workspace(H * nqb * tile);
  auto lse2 = workspace(H * nqb * kBlockQ), dvec = workspace(H * nqb * kBlockQ);
  auto qrows = workspace(rows_direct ? 0 : H * nqb * kBlockQ * Dp);
  auto dorows = workspace(rows_direct ? 0 : H * nqb * kBlockQ * Dp);
  at::parallel_for(0, H * nqb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / nqb;
      const RowBlock& blk = qblocks[item % nqb];
      const int64_t qn = blk.end - blk.begin;
      const T* qb = q + blk.begin * p.q_row_stride + h * p.q_head_stride;
      const T* dob = dout + blk.begin * bp.do_row_stride + h * bp.do_head_stride;
      transpose_block(qb, p.q_row_stride, qn, D, q_mul, qt.get() + item * tile);
      transpose_block(dob, bp.do_row_stride, qn, D, Acc(1), dot.get() + item * tile);
      if (!rows_direct) {
        int64_t ld;
        rows_as_acc<Acc>(qb, p.q_row_stride, qn, D, Dp, qrows.get() + item * kBlockQ * Dp, ld);
        rows_as_acc<Acc>(dob, bp.do_row_stride, qn, D, Dp, dorows.get() + item * kBlockQ * Dp, ld);
      }
      Acc* l2 = lse2.get() + item * kBlockQ;
      Acc* dd = dvec.get() + item * kBlockQ;
      for (int64_t i = 0; i < kBlockQ; ++i) {
        l2[i] = std::numeric_limits<Acc>::infinity();
        dd[i] = 0;
      }
      for (int64_t i = 0; i < qn; ++i) {
        l2[i] = static_cast<Acc>(p.lse[h * p.total_q + blk.begin + i]) * static_cast<Acc>(kLog2e);
        const T* orow = o + (blk.begin + i) * p.o_row_stride + h * p.o_head_stride;
        const T* drow = dob + i * bp.do_row_stride;
        dd[i] = chunked_dot<Acc>(drow, orow, D);
      }
    }
  });

  // 2. dQ accumulates in place when dq itself is Acc rows of Dp columns, else in an Acc buffer.
  const bool dq_direct = kDirectRows && Dp == D;
  std::vector<Acc> dq_buffer(dq_direct ? 0 : p.total_q * H * Dp);
  Acc* dq_acc = dq_direct ? reinterpret_cast<Acc*>(dq) : dq_buffer.data();
  const int64_t dq_rs = dq_direct ? bp.dq_row_stride : H * Dp, dq_hs = dq_direct ? bp.dq_head_stride : Dp;
  if (dq_direct) {
    at::parallel_for(0, p.total_q, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t h = 0; h < H; ++h) std::fill_n(dq_acc + r * dq_rs + h * dq_hs, D, Acc(0));
    });
  }
  // dQ of (head, query block) receives the sample's key blocks' contributions in key block order.
  std::unique_ptr<Turn[]> turns(new Turn[H * nqb]);

  // 3. Item = head * nkb + key block; its cost is its sample's query count (+1: zeroing dk/dv).
  std::vector<int64_t> costs(H * nkb);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t g = 0; g < nkb; ++g) {
      const int64_t b = kblocks[g].sample;
      costs[h * nkb + g] = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b] + 1;
    }
  run_costliest_first(
      costs, [&] { return BackwardScratch<Acc>(Dp); },
      [&](int64_t item, BackwardScratch<Acc>& s) {
        const int64_t h = item / nkb;
        const int64_t g = item % nkb;
        const RowBlock& blk = kblocks[g];
        const int64_t kn = blk.end - blk.begin;
        int64_t ldk, ldv;
        const Acc* kt = rows_as_acc<Acc>(k + blk.begin * p.k_row_stride + h * p.k_head_stride, p.k_row_stride, kn, D,
                                         Dp, s.k.data(), ldk);
        const Acc* vt = rows_as_acc<Acc>(v + blk.begin * p.v_row_stride + h * p.v_head_stride, p.v_row_stride, kn, D,
                                         Dp, s.v.data(), ldv);
        std::fill(s.dk.begin(), s.dk.end(), Acc(0));
        std::fill(s.dv.begin(), s.dv.end(), Acc(0));
        const int64_t q_first = qfirst[blk.sample], q_count = qfirst[blk.sample + 1] - q_first;
        // Every key block sweeps the query blocks in the same order: key block j of the sample adds to a
        // query block's dQ right after key block j - 1 did (run_costliest_first starts them in that order,
        // so each waits, if at all, on one that is already running).
        const int64_t turn = g - kfirst[blk.sample];
        for (int64_t qg = q_first; qg < q_first + q_count; ++qg) {
          const int64_t slot = h * nqb + qg;
          const RowBlock& qblk = qblocks[qg];
          const int64_t qn = qblk.end - qblk.begin;
          const Acc* l2 = lse2.get() + slot * kBlockQ;
          const Acc* dd = dvec.get() + slot * kBlockQ;
          // P^T = exp2(K Q^T - lse2)
          gemm<Acc>(kn, kBlockQ, D, kt, ldk, 1, qt.get() + slot * tile, kBlockQ, s.st.data(), kBlockQ, false);
          // dP^T = V dO^T
          gemm<Acc>(kn, kBlockQ, D, vt, ldv, 1, dot.get() + slot * tile, kBlockQ, s.dpt.data(), kBlockQ, false);
          constexpr int W = kLanes<Acc>;
          for (int64_t j = 0; j < kn; ++j)
            for (int64_t c = 0; c < kBlockQ; c += W) {
              Acc* sp = s.st.data() + j * kBlockQ + c;
              Acc* dp = s.dpt.data() + j * kBlockQ + c;
              const Vec<Acc> pv = exp2v(load(sp) - load(l2 + c));
              store(sp, pv);
              store(dp, pv * (load(dp) - load(dd + c)) * scale);  // dS^T, scale folded in
            }
          const Acc *qr, *dor;
          int64_t ldq, lddo;
          if (rows_direct) {
            qr = reinterpret_cast<const Acc*>(q + qblk.begin * p.q_row_stride + h * p.q_head_stride);
            dor = reinterpret_cast<const Acc*>(dout + qblk.begin * bp.do_row_stride + h * bp.do_head_stride);
            ldq = p.q_row_stride;
            lddo = bp.do_row_stride;
          } else {
            qr = qrows.get() + slot * kBlockQ * Dp;
            dor = dorows.get() + slot * kBlockQ * Dp;
            ldq = lddo = Dp;
          }
          // dV += P^T dO, dK += dS^T Q (these key rows belong to this item alone)
          gemm<Acc>(kn, Dp, qn, s.st.data(), kBlockQ, 1, dor, lddo, s.dv.data(), Dp, true);
          gemm<Acc>(kn, Dp, qn, s.dpt.data(), kBlockQ, 1, qr, ldq, s.dk.data(), Dp, true);
          // dQ += dS K (shared with the sample's other key blocks: in turn)
          turns[slot].wait_for(turn);
          Acc* dq_rows = dq_acc + qblk.begin * dq_rs + h * dq_hs;
          gemm<Acc>(qn, Dp, kn, s.dpt.data(), 1, kBlockQ, kt, ldk, dq_rows, dq_rs, true);
          turns[slot].done(turn);
        }
        for (int64_t j = 0; j < kn; ++j) {
          T* dkr = dk + (blk.begin + j) * bp.dk_row_stride + h * bp.dk_head_stride;
          T* dvr = dv + (blk.begin + j) * bp.dv_row_stride + h * bp.dv_head_stride;
          for (int64_t d = 0; d < D; ++d) {
            dkr[d] = static_cast<T>(s.dk[j * Dp + d]);
            dvr[d] = static_cast<T>(s.dv[j * Dp + d]);
          }
        }
      });

  // 4. dQ from its buffer; rows no key block touched (samples without keys) are 0 there.
  if (!dq_direct) {
    at::parallel_for(0, p.total_q, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t h = 0; h < H; ++h) {
          T* dst = dq + r * bp.dq_row_stride + h * bp.dq_head_stride;
          const Acc* src = dq_acc + r * dq_rs + h * dq_hs;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d]);
        }
    });
  }
}

template <typename Fn>
void dispatch_dtype(AttnDtype dtype, Fn&& fn) {
  switch (dtype) {
    case AttnDtype::kFloat32: return fn(float{});
    case AttnDtype::kFloat16: return fn(c10::Half{});
    case AttnDtype::kBFloat16: return fn(c10::BFloat16{});
    case AttnDtype::kFloat64: return fn(double{});
  }
}

// The entry points of this copy, every dtype: outputs and gradients as described by the params.
void varlen_attn_forward(const VarlenAttnParams& p, double softmax_scale) {
  dispatch_dtype(p.dtype, [&](auto t) { forward_kernel<decltype(t)>(p, softmax_scale); });
}
void varlen_attn_backward(const VarlenAttnBwdParams& b, double softmax_scale) {
  dispatch_dtype(b.fwd.dtype, [&](auto t) { backward_kernel<decltype(t)>(b, softmax_scale); });
}

}  // namespace
}  // namespace uniref
