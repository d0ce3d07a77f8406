// Runs the CUDA varlen attention kernels (the real kernel source, the shipped tile configurations)
// on the CPU emulator and compares them with a float64 reference. Build and run:
//   tests/cuda_emu/run.sh            (or see tests/test_attention_cuda_build.py)
// Usage: emu_attention_test [quick|all]   or   emu_attention_test <f16|bf16> <32|64|128> <eager|lazy> <seed> <case>
// (case: 0 mixed, 1 long, 2 extreme, -1 garbage cu_seqlens)
#define UNIREF_ATTN_EMULATE 1
#include "attention/varlen_attn_configs.cuh"
#include "attention/varlen_attn_cuda_support.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace uniref;
using namespace uniref::attn;

namespace {

// ---- host launchers mirroring csrc/attention/varlen_attn_cuda_kernels.cu ------------------------
template <typename Tr>
void emu_fwd(const VarlenAttnParams& p) {
  if (p.total_q == 0 || p.batch == 0 || p.heads == 0 || p.max_seqlen_q == 0) return;
  const dim3 grid(static_cast<unsigned>(fwd_grid_x<Tr>(p)), static_cast<unsigned>(p.heads));
  uniref_emu::launch(grid, dim3(Tr::kThreads), Tr::kSmemBytes, [&] { varlen_attn_fwd_kernel<Tr>(p); });
}

template <typename T, int D>
void emu_bwd(const VarlenAttnBwdParams& bp, float* dq_accum, float* dsum) {
  using Tr = typename BwdConfig<T, D>::Traits;
  const VarlenAttnParams& p = bp.fwd;
  if (p.heads == 0 || (p.total_q == 0 && p.total_k == 0)) return;
  const dim3 rowwise(static_cast<unsigned>(rowwise_grid_x(p)));
  if (p.total_q > 0)
    uniref_emu::launch(rowwise, dim3(256), 0, [&] { varlen_attn_bwd_preprocess_kernel<T, D>(bp, dq_accum, dsum); });
  if (p.total_k > 0 && p.max_seqlen_k > 0 && p.batch > 0) {
    const dim3 grid(static_cast<unsigned>(bwd_grid_x<Tr>(p)), static_cast<unsigned>(p.heads));
    uniref_emu::launch(grid, dim3(Tr::kThreads), Tr::kSmemBytes, [&] { varlen_attn_bwd_kernel<Tr>(bp, dq_accum, dsum); });
  }
  if (p.total_q > 0)
    uniref_emu::launch(rowwise, dim3(256), 0, [&] { varlen_attn_bwd_convert_dq_kernel<T, D>(bp, dq_accum); });
}

// ---- buffers -------------------------------------------------------------------------------------
template <typename T>
uint16_t bits_of(T x) {
  uint16_t b;
  std::memcpy(&b, &x, 2);
  return b;
}

// A strided (rows, heads, D) tensor of T inside a larger buffer, with guard regions around it.
template <typename T>
struct Strided {
  int64_t rows = 0, heads = 0, d = 0, row_stride = 0, head_stride = 0;
  static constexpr int64_t kGuard = 64;  // elements before and after
  std::vector<T> buf;
  T* data() { return buf.data() + kGuard; }
  void init(int64_t r, int64_t h, int64_t dd, int64_t rs, int64_t hs, uint16_t fill_bits) {
    rows = r, heads = h, d = dd, row_stride = rs, head_stride = hs;
    const int64_t extent = r > 0 ? (r - 1) * rs + (h - 1) * hs + dd : 0;
    buf.assign(static_cast<size_t>(extent + 2 * kGuard), T());
    for (auto& x : buf) std::memcpy(static_cast<void*>(&x), &fill_bits, 2);
  }
  T& at(int64_t r, int64_t h, int64_t k) { return data()[r * row_stride + h * head_stride + k]; }
  float get(int64_t r, int64_t h, int64_t k) { return to_float(at(r, h, k)); }
  bool guards_intact(uint16_t fill_bits) {
    for (int64_t i = 0; i < kGuard; ++i)
      if (bits_of(buf[i]) != fill_bits || bits_of(buf[buf.size() - 1 - i]) != fill_bits) return false;
    return true;
  }
};

struct Case {
  const char* name;
  std::vector<int> lq, lk;
  int heads;
  double scale_mult;  // softmax_scale = scale_mult / sqrt(D)
  bool strided;
  bool positive;  // q, k drawn from |N(0,1)| + 0.5: with a negative scale every score is far below 0
};

std::vector<Case> cases() {
  return {
      // lengths 1, odd sizes, queries without keys, keys without queries, several query tiles per
      // key block and key tiles per query block, partial tiles; strided q/k/v/dO views
      {"mixed", {1, 37, 130, 0, 64, 9}, {5, 0, 200, 17, 64, 9}, 2, 1.0, true, false},
      // longer samples (3+ tiles each way) and a negative softmax_scale
      {"long", {150, 3}, {290, 70}, 1, -0.7, false, false},
      // scores around -100..-300: lse far below 0, so 2^(0 - lse) overflows for a padded key row
      // unless masked; partial tiles only
      {"extreme", {45, 100}, {77, 30}, 1, -16.0, false, true},
  };
}

int failures = 0;
#define CHECK(cond, ...)                        \
  do {                                          \
    if (!(cond)) {                              \
      std::printf("  FAIL: " __VA_ARGS__);      \
      std::printf("\n");                        \
      ++failures;                               \
    }                                           \
  } while (0)

// garbage = true: after building valid buffers, replace cu_seqlens by nonsense (negative, decreasing,
// past the end, longer than max_seqlen) -- what a GPU caller could pass, since the binding cannot
// read device-side offsets. Only memory safety is checked then: every cp.async source inside its
// buffer (emulator), no write outside the outputs (guards), no deadlock.
template <typename T, int D>
void run_case(const Case& c, bool eager, uint64_t seed, bool garbage = false) {
  uniref_emu::g_options.eager_copies = eager;
  uniref_emu::g_options.seed = seed;
  uniref_emu::clear_globals();
  const bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  const int B = static_cast<int>(c.lq.size());
  const int H = c.heads;
  std::vector<int32_t> cuq(B + 1, 0), cuk(B + 1, 0);
  int max_q = 0, max_k = 0;
  for (int b = 0; b < B; ++b) {
    cuq[b + 1] = cuq[b] + c.lq[b];
    cuk[b + 1] = cuk[b] + c.lk[b];
    max_q = std::max(max_q, c.lq[b]);
    max_k = std::max(max_k, c.lk[b]);
  }
  const int Tq = cuq[B], Tk = cuk[B];
  const double scale = c.scale_mult / std::sqrt(static_cast<double>(D));
  std::mt19937_64 rng(seed * 7919 + D);
  std::normal_distribution<float> normal(0.f, 1.f);

  const uint16_t zero_bits = 0;
  const uint16_t nan_bits = bits_of(from_float<T>(NAN));
  Strided<T> q, k, v, dout, out, dq, dk, dv;
  if (c.strided) {  // views into wider rows / heads, like slices of a fused qkv projection
    q.init(Tq, H, D, H * D + 8, D, zero_bits);
    k.init(Tk, H, D, H * (D + 16), D + 16, zero_bits);
    v.init(Tk, H, D, 3 * H * D, D, zero_bits);
    dout.init(Tq, H, D, H * D + 24, D, zero_bits);
  } else {
    q.init(Tq, H, D, H * D, D, zero_bits);
    k.init(Tk, H, D, H * D, D, zero_bits);
    v.init(Tk, H, D, H * D, D, zero_bits);
    dout.init(Tq, H, D, H * D, D, zero_bits);
  }
  // Outputs and scratch are poisoned with NaN: whatever the kernels do not write stays NaN.
  out.init(Tq, H, D, H * D, D, nan_bits);
  dq.init(Tq, H, D, H * D, D, nan_bits);
  dk.init(Tk, H, D, H * D, D, nan_bits);
  dv.init(Tk, H, D, H * D, D, nan_bits);
  for (int r = 0; r < Tq; ++r)
    for (int h = 0; h < H; ++h)
      for (int e = 0; e < D; ++e) {
        q.at(r, h, e) = from_float<T>(c.positive ? std::fabs(normal(rng)) + 0.5f : normal(rng));
        dout.at(r, h, e) = from_float<T>(normal(rng));
      }
  for (int r = 0; r < Tk; ++r)
    for (int h = 0; h < H; ++h)
      for (int e = 0; e < D; ++e) {
        k.at(r, h, e) = from_float<T>(c.positive ? std::fabs(normal(rng)) + 0.5f : normal(rng));
        v.at(r, h, e) = from_float<T>(normal(rng));
      }
  const int64_t G = 64;
  std::vector<float> lse_buf(static_cast<size_t>(H) * Tq + 2 * G, NAN);
  float* lse = lse_buf.data() + G;
  std::vector<float> dq_accum(static_cast<size_t>(Tq) * H * D + 2 * G, NAN), dsum(static_cast<size_t>(H) * Tq + 2 * G, NAN);

  for (auto* t : {&q, &k, &v, &dout, &out}) uniref_emu::register_global(t->buf.data(), t->buf.size() * sizeof(T));
  uniref_emu::register_global(lse_buf.data(), lse_buf.size() * sizeof(float));
  uniref_emu::register_global(dsum.data(), dsum.size() * sizeof(float));

  VarlenAttnParams p{};
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.data();
  p.lse = lse;
  p.cu_seqlens_q = cuq.data();
  p.cu_seqlens_k = cuk.data();
  p.q_row_stride = q.row_stride, p.q_head_stride = q.head_stride;
  p.k_row_stride = k.row_stride, p.k_head_stride = k.head_stride;
  p.v_row_stride = v.row_stride, p.v_head_stride = v.head_stride;
  p.o_row_stride = out.row_stride, p.o_head_stride = out.head_stride;
  p.batch = B, p.heads = H, p.head_dim = D, p.total_q = Tq, p.total_k = Tk;
  p.max_seqlen_q = max_q, p.max_seqlen_k = max_k;
  p.softmax_scale = static_cast<float>(scale);
  p.dtype = bf16 ? AttnDtype::kBFloat16 : AttnDtype::kFloat16;

  if (garbage) {
    std::vector<int32_t> gq = {0, 50, 20, Tq + 999, -5, Tq + 100, 7}, gk = {3, -7, Tk + 400, 60, 60, 2, Tk};
    gq.resize(B + 1, Tq + 3);
    gk.resize(B + 1, -1);
    cuq = gq;
    cuk = gk;
    p.cu_seqlens_q = cuq.data();
    p.cu_seqlens_k = cuk.data();
    p.max_seqlen_q = 70;   // shorter than some "samples" above, longer than others
    p.max_seqlen_k = 300;
  }
  const uint64_t sw0 = uniref_emu::g_switches;
  emu_fwd<typename FwdConfig<T, D>::Traits>(p);

  VarlenAttnBwdParams bp{};
  bp.fwd = p;
  bp.dout = dout.data();
  bp.dq = dq.data();
  bp.dk = dk.data();
  bp.dv = dv.data();
  bp.do_row_stride = dout.row_stride, bp.do_head_stride = dout.head_stride;
  bp.dq_row_stride = dq.row_stride, bp.dq_head_stride = dq.head_stride;
  bp.dk_row_stride = dk.row_stride, bp.dk_head_stride = dk.head_stride;
  bp.dv_row_stride = dv.row_stride, bp.dv_head_stride = dv.head_stride;
  emu_bwd<T, D>(bp, dq_accum.data() + G, dsum.data() + G);
  if (garbage) {
    std::printf("%-4s D=%-3d garbage cu_seqlens %-5s seed=%llu: no out-of-bounds access  [%llu switches]\n",
                bf16 ? "bf16" : "f16", D, eager ? "eager" : "lazy", static_cast<unsigned long long>(seed),
                static_cast<unsigned long long>(uniref_emu::g_switches - sw0));
    for (auto* t : {&out, &dq, &dk, &dv}) CHECK(t->guards_intact(nan_bits), "write outside an output tensor");
    for (int64_t i = 0; i < G; ++i) {
      CHECK(std::isnan(lse_buf[i]) && std::isnan(lse_buf[lse_buf.size() - 1 - i]), "write outside lse");
      CHECK(std::isnan(dq_accum[i]) && std::isnan(dq_accum[dq_accum.size() - 1 - i]), "write outside dq_accum");
    }
    return;
  }

  // ---- float64 reference, per sample and head ----
  double err_o = 0, max_o = 0, err_lse = 0, err_dq = 0, max_dq = 0, err_dk = 0, max_dk = 0, err_dv = 0, max_dv = 0;
  bool exact_ok = true, nan_free = true;
  for (int b = 0; b < B; ++b) {
    const int q0 = cuq[b], nq = c.lq[b], k0 = cuk[b], nk = c.lk[b];
    for (int h = 0; h < H; ++h) {
      std::vector<double> P(static_cast<size_t>(nq) * nk), O(static_cast<size_t>(nq) * D, 0.0), L(nq);
      for (int i = 0; i < nq; ++i) {
        double m = -INFINITY;
        for (int j = 0; j < nk; ++j) {
          double s = 0;
          for (int e = 0; e < D; ++e) s += static_cast<double>(q.get(q0 + i, h, e)) * k.get(k0 + j, h, e);
          P[i * nk + j] = s * scale;
          m = std::max(m, s * scale);
        }
        double l = 0;
        for (int j = 0; j < nk; ++j) l += (P[i * nk + j] = std::exp(P[i * nk + j] - m));
        for (int j = 0; j < nk; ++j) P[i * nk + j] /= l;
        L[i] = nk > 0 ? m + std::log(l) : -INFINITY;
        for (int j = 0; j < nk; ++j)
          for (int e = 0; e < D; ++e) O[i * D + e] += P[i * nk + j] * v.get(k0 + j, h, e);
        // forward checks
        const float got_lse = lse[static_cast<int64_t>(h) * Tq + q0 + i];
        if (nk == 0) {
          exact_ok &= got_lse == -INFINITY;
          for (int e = 0; e < D; ++e) exact_ok &= out.get(q0 + i, h, e) == 0.f;
        } else {
          if (std::isnan(got_lse)) nan_free = false;
          err_lse = std::max(err_lse, std::fabs(got_lse - L[i]));
        }
        for (int e = 0; e < D; ++e) {
          const float got = out.get(q0 + i, h, e);
          if (std::isnan(got)) nan_free = false;
          err_o = std::max(err_o, std::fabs(got - O[i * D + e]));
          max_o = std::max(max_o, std::fabs(O[i * D + e]));
        }
      }
      // backward
      std::vector<double> dS(static_cast<size_t>(nq) * nk);
      for (int i = 0; i < nq; ++i) {
        double Di = 0;
        for (int e = 0; e < D; ++e) Di += static_cast<double>(dout.get(q0 + i, h, e)) * O[i * D + e];
        for (int j = 0; j < nk; ++j) {
          double dp = 0;
          for (int e = 0; e < D; ++e) dp += static_cast<double>(dout.get(q0 + i, h, e)) * v.get(k0 + j, h, e);
          dS[i * nk + j] = P[i * nk + j] * (dp - Di);
        }
      }
      for (int i = 0; i < nq; ++i)
        for (int e = 0; e < D; ++e) {
          double r = 0;
          for (int j = 0; j < nk; ++j) r += dS[i * nk + j] * k.get(k0 + j, h, e);
          r *= scale;
          const float got = dq.get(q0 + i, h, e);
          if (std::isnan(got)) nan_free = false;
          if (nk == 0) exact_ok &= got == 0.f;
          err_dq = std::max(err_dq, std::fabs(got - r));
          max_dq = std::max(max_dq, std::fabs(r));
        }
      for (int j = 0; j < nk; ++j)
        for (int e = 0; e < D; ++e) {
          double rk = 0, rv = 0;
          for (int i = 0; i < nq; ++i) {
            rk += dS[i * nk + j] * q.get(q0 + i, h, e);
            rv += P[i * nk + j] * dout.get(q0 + i, h, e);
          }
          rk *= scale;
          const float gk = dk.get(k0 + j, h, e), gv = dv.get(k0 + j, h, e);
          if (std::isnan(gk) || std::isnan(gv)) nan_free = false;
          if (nq == 0) exact_ok &= gk == 0.f && gv == 0.f;
          err_dk = std::max(err_dk, std::fabs(gk - rk));
          max_dk = std::max(max_dk, std::fabs(rk));
          err_dv = std::max(err_dv, std::fabs(gv - rv));
          max_dv = std::max(max_dv, std::fabs(rv));
        }
    }
  }
  // Tolerances: bf16 keeps 8 significant bits, fp16 11; P and dS are rounded to T before their
  // products. An indexing or masking error gives errors of the order of the values themselves.
  const double tol = bf16 ? 2.5e-2 : 4e-3;
  const double rel_o = err_o / std::max(max_o, 1e-6), rel_dq = err_dq / std::max(max_dq, 1e-6),
               rel_dk = err_dk / std::max(max_dk, 1e-6), rel_dv = err_dv / std::max(max_dv, 1e-6);
  std::printf("%-4s D=%-3d %-5s %-5s seed=%llu: out %.2e lse %.2e dq %.2e dk %.2e dv %.2e (max-rel)  [%llu switches]\n",
              bf16 ? "bf16" : "f16", D, c.name, eager ? "eager" : "lazy", static_cast<unsigned long long>(seed), rel_o,
              err_lse, rel_dq, rel_dk, rel_dv, static_cast<unsigned long long>(uniref_emu::g_switches - sw0));
  CHECK(nan_free, "NaN in an output: an element was not written (outputs were poisoned with NaN)");
  CHECK(exact_ok, "rows without keys must give out = 0, lse = -inf, dq = 0; keys without queries dk = dv = 0");
  CHECK(rel_o < tol, "out error %.3e >= %.1e", rel_o, tol);
  CHECK(err_lse < 1e-3, "lse error %.3e", err_lse);
  CHECK(rel_dq < 2 * tol && rel_dk < 2 * tol && rel_dv < 2 * tol, "gradient error dq %.3e dk %.3e dv %.3e >= %.1e",
        rel_dq, rel_dk, rel_dv, 2 * tol);
  for (auto* t : {&out, &dq, &dk, &dv}) CHECK(t->guards_intact(nan_bits), "write outside an output tensor");
  for (int64_t i = 0; i < G; ++i) {
    CHECK(std::isnan(lse_buf[i]) && std::isnan(lse_buf[lse_buf.size() - 1 - i]), "write outside lse");
    CHECK(std::isnan(dq_accum[i]) && std::isnan(dq_accum[dq_accum.size() - 1 - i]), "write outside dq_accum");
    CHECK(std::isnan(dsum[i]) && std::isnan(dsum[dsum.size() - 1 - i]), "write outside dsum");
  }
  std::fflush(stdout);
}

template <typename T>
void run_dim(int d, int case_idx, bool eager, uint64_t seed) {
  const bool garbage = case_idx < 0;
  const Case c = cases()[garbage ? 0 : case_idx];
  const bool known = with_cuda_attn_head_dim(d, false, [&](auto dim) {
    run_case<T, decltype(dim)::value>(c, eager, seed, garbage);
    return true;
  });
  if (!known) {
    std::printf("unsupported D %d\n", d);
    ++failures;
  }
}

void run_one(bool bf16, int d, int case_idx, bool eager, uint64_t seed) {
  if (bf16)
    run_dim<__nv_bfloat16>(d, case_idx, eager, seed);
  else
    run_dim<__half>(d, case_idx, eager, seed);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "quick";
  if (mode == "quick" || mode == "all") {
    // quick: every (dtype, head dim, case) once, copy modes alternating; all: both copy modes.
    const int ncases = static_cast<int>(cases().size());
    uint64_t seed = 1;
    for (int d : kCudaAttnHeadDims)
      for (int bf16 = 0; bf16 < 2; ++bf16)
        for (int ci = 0; ci < ncases; ++ci)
          for (int eager = 0; eager < 2; ++eager) {
            const bool take = mode == "all" || eager == (ci + bf16 + d / 64) % 2;
            if (take) run_one(bf16, d, ci, eager, seed++);
          }
    for (int d : kCudaAttnHeadDims) run_one(d == 64, d, -1, d != 64, seed++);  // garbage cu_seqlens
  } else if (argc == 6) {
    run_one(std::string(argv[1]) == "bf16", std::atoi(argv[2]), std::atoi(argv[5]), std::string(argv[3]) == "eager",
            std::strtoull(argv[4], nullptr, 10));
  } else {
    std::printf("usage: %s [quick|all] | <f16|bf16> <32|64|128> <eager|lazy> <seed> <case>\n", argv[0]);
    return 2;
  }
  std::printf(failures ? "FAILED: %d check(s)\n" : "all emulated kernel checks passed\n", failures);
  return failures ? 1 : 0;
}
