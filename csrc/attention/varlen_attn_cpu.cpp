// Torch bindings of the CPU varlen attention kernels (varlen_attn_cpu_kernels.h): checks, outputs, and the
// call into the build of the kernels that this CPU runs best (varlen_attn_cpu_dispatch.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>

#include "attention/varlen_attn_checks.h"
#include "attention/varlen_attn_cpu_dispatch.h"
#include "attention/varlen_attn_cpu_kernels.h"

#ifndef UNIREF_CPU_ARCH
#define UNIREF_CPU_ARCH "unknown"
#endif

namespace uniref {
namespace {

// This extension's own build of the kernels (UNIREF_CPU_ARCH), until a wider one is handed over.
const CpuAttnKernels kOwnKernels{UNIREF_CPU_ARCH, &varlen_attn_forward, &varlen_attn_backward};
std::atomic<const CpuAttnKernels*> active_kernels{&kOwnKernels};

}  // namespace

const CpuAttnKernels& cpu_attn_kernels() { return *active_kernels.load(std::memory_order_acquire); }
void use_cpu_attn_kernels(const CpuAttnKernels* kernels) {
  active_kernels.store(kernels != nullptr ? kernels : &kOwnKernels, std::memory_order_release);
}

namespace {

std::tuple<at::Tensor, at::Tensor> varlen_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                       int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                       double softmax_scale) {
  VarlenAttnParams p =
      describe_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale);
  auto [out, lse] = forward_outputs(q, p);
  cpu_attn_kernels().forward(p, softmax_scale);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attn_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double softmax_scale) {
  VarlenAttnBwdParams b{};
  b.fwd = describe_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale);
  auto grads = describe_backward(grad_out, q, k, v, out, lse, b);
  cpu_attn_kernels().backward(b, softmax_scale);
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(uniref, CPU, m) {
  m.impl("varlen_attn_fwd", &varlen_attn_fwd_cpu);
  m.impl("varlen_attn_bwd", &varlen_attn_bwd_cpu);
}

}  // namespace uniref
