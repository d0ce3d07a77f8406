// Host entry points of the CUDA varlen attention kernels (varlen_attn_cuda_kernels.cu). Torch-free:
// the parameter structs of varlen_attn_params.h and a stream, so that the kernels compile with nvcc
// alone and the binding (varlen_attn_cuda.cpp) with the host compiler.
#pragma once
#include <cuda_runtime.h>

#include "attention/varlen_attn_params.h"

namespace uniref {

// nullptr when the CUDA kernels can run this problem; otherwise why not (dtype, head dim, sizes,
// alignment), for the binding's error message. Requirements: float16 or bfloat16; head_dim 32, 64
// or 128; q/k/v/out (and grad_out, dq/dk/dv) 16-byte aligned with row and head strides that are
// multiples of 8 elements; heads <= 65535.
const char* varlen_attn_cuda_unsupported(const VarlenAttnParams& p);
const char* varlen_attn_cuda_bwd_unsupported(const VarlenAttnBwdParams& p);

// Forward: writes p.out and p.lse.
cudaError_t launch_varlen_attn_fwd(const VarlenAttnParams& p, cudaStream_t stream);

// Backward: writes dq, dk, dv. Scratch owned by the caller: dq_accum fp32 (total_q, heads, head_dim)
// contiguous, dsum fp32 (heads, total_q) contiguous; neither needs initializing.
cudaError_t launch_varlen_attn_bwd(const VarlenAttnBwdParams& p, float* dq_accum, float* dsum, cudaStream_t stream);

}  // namespace uniref
