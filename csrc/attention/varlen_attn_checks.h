// Argument checks shared by the CPU and CUDA bindings of varlen attention. Every invariant the
// kernels rely on is checked here, so bad input raises a clear error instead of reading out of bounds.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <utility>

#include "attention/varlen_attn_params.h"

namespace uniref {

inline AttnDtype attn_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return AttnDtype::kFloat32;
    case at::kHalf: return AttnDtype::kFloat16;
    case at::kBFloat16: return AttnDtype::kBFloat16;
    case at::kDouble: return AttnDtype::kFloat64;
    default:
      TORCH_CHECK(false, "varlen_attention: q/k/v must be float32, float16 or bfloat16 (float64 on CPU), got ",
                  t.scalar_type());
  }
}

// Checks cu_seqlens metadata always, and its values when it lives on the CPU (reading device
// values would synchronize; the CUDA kernels clamp every row index they derive from them).
inline void check_attn_cu_seqlens(const at::Tensor& cu, const char* name, int64_t total, int64_t max_seqlen,
                                  const at::Device& device) {
  TORCH_CHECK(cu.scalar_type() == at::kInt, "varlen_attention: ", name, " must be int32, got ", cu.scalar_type(),
              "; build it with torch.tensor(offsets, dtype=torch.int32)");
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1, "varlen_attention: ", name, " must be 1-D of shape (B+1,), got ",
              cu.sizes());
  TORCH_CHECK(cu.device() == device, "varlen_attention: ", name, " is on ", cu.device(), " but q is on ", device);
  TORCH_CHECK(cu.is_contiguous(), "varlen_attention: ", name, " must be contiguous");
  TORCH_CHECK(max_seqlen >= 0, "varlen_attention: max_seqlen for ", name, " must be >= 0, got ", max_seqlen);
  if (!cu.device().is_cpu()) return;
  const int32_t* c = cu.data_ptr<int32_t>();
  TORCH_CHECK(c[0] == 0, "varlen_attention: ", name, "[0] must be 0, got ", c[0]);
  for (int64_t b = 0; b + 1 < cu.size(0); ++b) {
    const int64_t len = static_cast<int64_t>(c[b + 1]) - c[b];
    TORCH_CHECK(len >= 0, "varlen_attention: ", name, " must be non-decreasing, but ", name, "[", b + 1, "]=",
                c[b + 1], " < ", name, "[", b, "]=", c[b]);
    TORCH_CHECK(len <= max_seqlen, "varlen_attention: sample ", b, " has ", len, " rows by ", name,
                ", more than max_seqlen=", max_seqlen, "; pass the true maximum length");
  }
  TORCH_CHECK(c[cu.size(0) - 1] == total, "varlen_attention: ", name, "[-1]=", c[cu.size(0) - 1],
              " must equal the number of rows, ", total);
}

inline void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, "varlen_attention: ", name, " must be (total, heads, head_dim), got shape ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1 || t.size(2) == 1, "varlen_attention: ", name,
              "'s last dimension must be contiguous (stride 1), got strides ", t.strides());
}

// Validates the forward's arguments and describes them; out and lse are filled in by the caller.
inline VarlenAttnParams describe_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                                           int64_t max_k, double softmax_scale) {
  check_rows(q, "q");
  check_rows(k, "k");
  check_rows(v, "v");
  TORCH_CHECK(k.sizes() == v.sizes(), "varlen_attention: k and v must have the same shape, got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(q.size(1) == k.size(1), "varlen_attention: q has ", q.size(1), " heads but k/v have ", k.size(1),
              " (grouped-query attention is not supported; repeat k/v heads first)");
  TORCH_CHECK(q.size(2) == k.size(2), "varlen_attention: q has head_dim ", q.size(2), " but k/v have ", k.size(2));
  TORCH_CHECK(q.size(1) > 0 && q.size(2) > 0, "varlen_attention: heads and head_dim must be positive, got ",
              q.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "varlen_attention: q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), "varlen_attention: q, k, v must be on one device, got ",
              q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(cu_q.numel() == cu_k.numel(), "varlen_attention: cu_seqlens_q has ", cu_q.numel(),
              " entries but cu_seqlens_k has ", cu_k.numel(), "; both need B+1");
  TORCH_CHECK(std::isfinite(softmax_scale), "varlen_attention: softmax_scale must be finite, got ", softmax_scale);
  check_attn_cu_seqlens(cu_q, "cu_seqlens_q", q.size(0), max_q, q.device());
  check_attn_cu_seqlens(cu_k, "cu_seqlens_k", k.size(0), max_k, q.device());

  VarlenAttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.cu_seqlens_q = cu_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_k.data_ptr<int32_t>();
  p.q_row_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.k_row_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.v_row_stride = v.stride(0);
  p.v_head_stride = v.stride(1);
  p.batch = cu_q.size(0) - 1;
  p.heads = q.size(1);
  p.head_dim = q.size(2);
  p.total_q = q.size(0);
  p.total_k = k.size(0);
  p.max_seqlen_q = max_q;
  p.max_seqlen_k = max_k;
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.dtype = attn_dtype(q);
  return p;
}

// Allocates the forward's outputs (out like q but contiguous; lse fp32 (H, Tq)) and records them.
inline std::pair<at::Tensor, at::Tensor> forward_outputs(const at::Tensor& q, VarlenAttnParams& p) {
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.o_row_stride = out.stride(0);
  p.o_head_stride = out.stride(1);
  return {out, lse};
}

// Validates the backward's extra arguments and allocates dq, dk, dv (contiguous, like q, k, v).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> describe_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, VarlenAttnBwdParams& b) {
  check_rows(dout, "grad_out");
  check_rows(out, "out");
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "varlen_attention backward: grad_out and out must have q's shape ", q.sizes(), ", got ",
              dout.sizes(), " and ", out.sizes());
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "varlen_attention backward: grad_out and out must have q's dtype ", q.scalar_type());
  TORCH_CHECK(dout.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
              "varlen_attention backward: all tensors must be on q's device ", q.device());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == q.size(1) &&
                  lse.size(1) == q.size(0) && lse.is_contiguous(),
              "varlen_attention backward: lse must be a contiguous float32 (heads, total_q) = (", q.size(1), ", ",
              q.size(0), ") tensor from the forward, got ", lse.scalar_type(), " ", lse.sizes());
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  b.fwd.out = const_cast<void*>(out.data_ptr());
  b.fwd.lse = const_cast<float*>(lse.data_ptr<float>());
  b.fwd.o_row_stride = out.stride(0);
  b.fwd.o_head_stride = out.stride(1);
  b.dout = dout.data_ptr();
  b.do_row_stride = dout.stride(0);
  b.do_head_stride = dout.stride(1);
  b.dq = dq.data_ptr();
  b.dk = dk.data_ptr();
  b.dv = dv.data_ptr();
  b.dq_row_stride = dq.stride(0);
  b.dq_head_stride = dq.stride(1);
  b.dk_row_stride = dk.stride(0);
  b.dk_head_stride = dk.stride(1);
  b.dv_row_stride = dv.stride(0);
  b.dv_head_stride = dv.stride(1);
  return {dq, dk, dv};
}

}  // namespace uniref
