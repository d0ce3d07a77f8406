// Torch bindings of the CUDA varlen attention kernels: checks (shared header), layout fixes,
// allocation of outputs and scratch, launch on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "attention/varlen_attn_checks.h"
#include "attention/varlen_attn_cuda_support.h"
#include "attention/varlen_attn_launch.h"

namespace uniref {
namespace {

// What the CUDA kernels cannot do at all; the Python side routes these to another backend.
void check_cuda_kernel_support(const at::Tensor& q, const char* op) {
  TORCH_CHECK(q.is_cuda(), op, ": expected CUDA tensors, got ", q.device());
  TORCH_CHECK(cuda_attn_dtype_ok(attn_dtype(q)), op, ": the CUDA kernels support ", kCudaAttnDtypesText,
              " only, got ", q.scalar_type(), "; use backend=\"sdpa\" (or \"auto\", which routes float32 there)");
  const int64_t d = q.size(2);
  TORCH_CHECK(cuda_attn_head_dim_ok(d), op, ": the CUDA kernels support head_dim ", kCudaAttnHeadDimsText,
              " only, got ", d, "; use backend=\"sdpa\" (or \"auto\")");
  TORCH_CHECK(q.size(1) <= 65535, op, ": the CUDA kernels support at most 65535 heads, got ", q.size(1));
}

// The kernels move 16 bytes at a time: rows must start 16-byte aligned (base address, row and head
// strides in multiples of 8 elements; the stride of a dimension of size <= 1 is never used).
bool rows_aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.size(0) <= 1 || t.stride(0) % 8 == 0) &&
         (t.size(1) <= 1 || t.stride(1) % 8 == 0);
}

// t itself when the kernels can read it in place, else a contiguous copy (fresh storage, aligned).
at::Tensor aligned_rows(const at::Tensor& t) {
  return rows_aligned(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

void check_launch(cudaError_t err, const char* op, const char* why) {
  TORCH_CHECK(why == nullptr, op, ": ", why);
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> varlen_attn_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
                                                        const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                        int64_t max_seqlen_k, double softmax_scale) {
  constexpr const char* op = "varlen_attention (CUDA forward)";
  // Full validation first (shapes, dtypes, devices, cu_seqlens metadata), with the shared messages.
  describe_attention(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale);
  check_cuda_kernel_support(q_in, op);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned_rows(q_in), k = aligned_rows(k_in), v = aligned_rows(v_in);
  VarlenAttnParams p =
      describe_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale);
  auto [out, lse] = forward_outputs(q, p);
  const char* why = varlen_attn_cuda_unsupported(p);
  const cudaError_t err = why ? cudaErrorInvalidValue : launch_varlen_attn_fwd(p, c10::cuda::getCurrentCUDAStream());
  check_launch(err, op, why);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attn_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale) {
  constexpr const char* op = "varlen_attention (CUDA backward)";
  describe_attention(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale);
  check_cuda_kernel_support(q_in, op);
  const c10::cuda::CUDAGuard guard(q_in.device());
  // (describe_backward below checks grad_out and out fully; their rank first, for the strides.)
  check_rows(grad_out_in, "grad_out");
  check_rows(out_in, "out");
  const at::Tensor q = aligned_rows(q_in), k = aligned_rows(k_in), v = aligned_rows(v_in);
  const at::Tensor grad_out = aligned_rows(grad_out_in), out = aligned_rows(out_in);
  VarlenAttnBwdParams b{};
  b.fwd = describe_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale);
  auto [dq, dk, dv] = describe_backward(grad_out, q, k, v, out, lse, b);
  // Scratch: fp32 dq accumulator (Tq, H, D) and D = rowsum(dO * O) (H, Tq); the preprocess kernel
  // initializes both.
  const at::TensorOptions f32 = q.options().dtype(at::kFloat);
  at::Tensor dq_accum = at::empty({q.size(0), q.size(1), q.size(2)}, f32);
  at::Tensor dsum = at::empty({q.size(1), q.size(0)}, f32);
  const char* why = varlen_attn_cuda_bwd_unsupported(b);
  const cudaError_t err = why ? cudaErrorInvalidValue
                              : launch_varlen_attn_bwd(b, dq_accum.data_ptr<float>(), dsum.data_ptr<float>(),
                                                       c10::cuda::getCurrentCUDAStream());
  check_launch(err, op, why);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(uniref, CUDA, m) {
  m.impl("varlen_attn_fwd", &varlen_attn_fwd_cuda);
  m.impl("varlen_attn_bwd", &varlen_attn_bwd_cuda);
}

}  // namespace uniref
