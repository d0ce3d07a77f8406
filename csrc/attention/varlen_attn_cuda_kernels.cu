// Launchers of the CUDA varlen attention kernels. Torch-free: CI compiles this file with nvcc alone.
#include <cstdint>

#include "attention/varlen_attn_configs.cuh"
#include "attention/varlen_attn_cuda_support.h"
#include "attention/varlen_attn_launch.h"

namespace uniref {
namespace {

using attn::BwdConfig;
using attn::FwdConfig;

constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1
constexpr int64_t kMaxGridY = 65535;

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// 16-byte vector access to every row of every head: aligned base, strides in multiples of 8
// elements (a stride that is never used, of a dimension of size <= 1, does not matter).
bool rows_ok(const void* ptr, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_stride) {
  return aligned16(ptr) && (rows <= 1 || row_stride % 8 == 0) && (heads <= 1 || head_stride % 8 == 0);
}

template <typename Tr>
cudaError_t run_fwd(const VarlenAttnParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(attn::fwd_grid_x<Tr>(p)), static_cast<unsigned>(p.heads));
  auto kernel = attn::varlen_attn_fwd_kernel<Tr>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_dtype(const VarlenAttnParams& p, cudaStream_t stream) {
  return with_cuda_attn_head_dim(p.head_dim, cudaErrorInvalidValue, [&](auto d) {
    return run_fwd<typename FwdConfig<T, decltype(d)::value>::Traits>(p, stream);
  });
}

template <typename T, int D>
cudaError_t run_bwd(const VarlenAttnBwdParams& bp, float* dq_accum, float* dsum, cudaStream_t stream) {
  using Tr = typename BwdConfig<T, D>::Traits;
  const VarlenAttnParams& p = bp.fwd;
  const bool have_q = p.total_q > 0;
  if (have_q) {  // D and a zeroed dq_accum
    attn::varlen_attn_bwd_preprocess_kernel<T, D>
        <<<static_cast<unsigned>(attn::rowwise_grid_x(p)), 256, 0, stream>>>(bp, dq_accum, dsum);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  // Runs even without queries: it writes dK = dV = 0 for every key of the samples.
  if (p.total_k > 0 && p.max_seqlen_k > 0 && p.batch > 0) {
    const dim3 grid(static_cast<unsigned>(attn::bwd_grid_x<Tr>(p)), static_cast<unsigned>(p.heads));
    auto kernel = attn::varlen_attn_bwd_kernel<Tr>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
    if (err != cudaSuccess) return err;
    kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(bp, dq_accum, dsum);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (have_q) {
    attn::varlen_attn_bwd_convert_dq_kernel<T, D>
        <<<static_cast<unsigned>(attn::rowwise_grid_x(p)), 256, 0, stream>>>(bp, dq_accum);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t bwd_dtype(const VarlenAttnBwdParams& bp, float* dq_accum, float* dsum, cudaStream_t stream) {
  return with_cuda_attn_head_dim(bp.fwd.head_dim, cudaErrorInvalidValue, [&](auto d) {
    return run_bwd<T, decltype(d)::value>(bp, dq_accum, dsum, stream);
  });
}

// Largest grid.x over the configurations of this head dim (the smallest tiles).
const char* grid_unsupported(const VarlenAttnParams& p) {
  if (p.heads > kMaxGridY) return "the CUDA kernels support at most 65535 heads";
  if (p.max_seqlen_q > kMaxGridX || p.max_seqlen_k > kMaxGridX) return "max_seqlen must be below 2^31";
  const int64_t tiles_q = attn::ceil_div(p.max_seqlen_q, 64);  // every kBlockM / kBlockN is >= 64
  const int64_t tiles_k = attn::ceil_div(p.max_seqlen_k, 64);
  if (tiles_q > kMaxGridX / (p.batch > 0 ? p.batch : 1) || tiles_k > kMaxGridX / (p.batch > 0 ? p.batch : 1))
    return "max_seqlen * batch is too large for one CUDA grid";
  return nullptr;
}

}  // namespace

const char* varlen_attn_cuda_unsupported(const VarlenAttnParams& p) {
  // (Literal messages: a const char* must outlive the call. They name the lists of varlen_attn_cuda_support.h.)
  static_assert(kCudaAttnDtypeCount == 2 && kCudaAttnHeadDimCount == 3, "update the two messages below");
  if (!cuda_attn_dtype_ok(p.dtype)) return "the CUDA kernels support float16 and bfloat16 only";
  if (!cuda_attn_head_dim_ok(p.head_dim)) return "the CUDA kernels support head_dim 32, 64 and 128 only";
  if (const char* why = grid_unsupported(p)) return why;
  if (!rows_ok(p.q, p.total_q, p.q_row_stride, p.heads, p.q_head_stride) ||
      !rows_ok(p.k, p.total_k, p.k_row_stride, p.heads, p.k_head_stride) ||
      !rows_ok(p.v, p.total_k, p.v_row_stride, p.heads, p.v_head_stride) ||
      (p.out != nullptr && !rows_ok(p.out, p.total_q, p.o_row_stride, p.heads, p.o_head_stride)))
    return "q, k, v and out need 16-byte aligned rows (base address, and row/head strides multiples of 8 elements)";
  return nullptr;
}

const char* varlen_attn_cuda_bwd_unsupported(const VarlenAttnBwdParams& b) {
  if (const char* why = varlen_attn_cuda_unsupported(b.fwd)) return why;
  const VarlenAttnParams& p = b.fwd;
  if (!rows_ok(b.dout, p.total_q, b.do_row_stride, p.heads, b.do_head_stride) ||
      !rows_ok(b.dq, p.total_q, b.dq_row_stride, p.heads, b.dq_head_stride) ||
      !rows_ok(b.dk, p.total_k, b.dk_row_stride, p.heads, b.dk_head_stride) ||
      !rows_ok(b.dv, p.total_k, b.dv_row_stride, p.heads, b.dv_head_stride))
    return "grad_out, dq, dk and dv need 16-byte aligned rows (base address, and row/head strides multiples of 8 "
           "elements)";
  return nullptr;
}

cudaError_t launch_varlen_attn_fwd(const VarlenAttnParams& p, cudaStream_t stream) {
  if (varlen_attn_cuda_unsupported(p) != nullptr) return cudaErrorInvalidValue;
  // Empty input returns before the pointer check: an empty output has no storage (data_ptr() is null).
  if (p.total_q == 0 || p.batch == 0 || p.heads == 0 || p.max_seqlen_q == 0) return cudaSuccess;
  if (p.out == nullptr || p.lse == nullptr) return cudaErrorInvalidValue;
  if (p.dtype == AttnDtype::kBFloat16) return fwd_dtype<__nv_bfloat16>(p, stream);
  return fwd_dtype<__half>(p, stream);
}

cudaError_t launch_varlen_attn_bwd(const VarlenAttnBwdParams& bp, float* dq_accum, float* dsum, cudaStream_t stream) {
  if (varlen_attn_cuda_bwd_unsupported(bp) != nullptr) return cudaErrorInvalidValue;
  const VarlenAttnParams& p = bp.fwd;
  if (p.heads == 0 || (p.total_q == 0 && p.total_k == 0)) return cudaSuccess;
  if (p.total_q > 0 && (dq_accum == nullptr || dsum == nullptr)) return cudaErrorInvalidValue;
  if (p.dtype == AttnDtype::kBFloat16) return bwd_dtype<__nv_bfloat16>(bp, dq_accum, dsum, stream);
  return bwd_dtype<__half>(bp, dq_accum, dsum, stream);
}

}  // namespace uniref
