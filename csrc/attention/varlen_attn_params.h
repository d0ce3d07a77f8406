// Plain description of a varlen attention problem, shared by the CPU kernels, the CUDA kernels and
// the torch bindings. Torch-free so that the CUDA kernels compile with nvcc alone.
//
// Layout: q (Tq, H, D), k and v (Tk, H, D), out and the gradients like their inputs; the last
// dimension is contiguous, rows and heads may have any stride (e.g. views into a fused qkv tensor).
// Sample b owns query rows [cu_seqlens_q[b], cu_seqlens_q[b+1]) and key rows
// [cu_seqlens_k[b], cu_seqlens_k[b+1]); attention is non-causal and never crosses samples.
#pragma once
#include <cstdint>

namespace uniref {

enum class AttnDtype : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct VarlenAttnParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // (H, Tq): natural-log log-sum-exp of the scaled scores of each query row

  const int32_t* cu_seqlens_q;  // (B + 1,)
  const int32_t* cu_seqlens_k;  // (B + 1,)

  // Strides in elements.
  int64_t q_row_stride, q_head_stride;
  int64_t k_row_stride, k_head_stride;
  int64_t v_row_stride, v_head_stride;
  int64_t o_row_stride, o_head_stride;

  int64_t batch;
  int64_t heads;
  int64_t head_dim;
  int64_t total_q;
  int64_t total_k;
  int64_t max_seqlen_q;
  int64_t max_seqlen_k;
  float softmax_scale;
  AttnDtype dtype;
};

struct VarlenAttnBwdParams {
  VarlenAttnParams fwd;  // q, k, v, out, lse (read only here) and the problem's sizes
  const void* dout;
  void* dq;
  void* dk;
  void* dv;
  int64_t do_row_stride, do_head_stride;
  int64_t dq_row_stride, dq_head_stride;
  int64_t dk_row_stride, dk_head_stride;
  int64_t dv_row_stride, dv_head_stride;
};

}  // namespace uniref
