// What the CUDA varlen attention kernels support, in one place: the launchers instantiate exactly these
// head dims (varlen_attn_cuda_kernels.cu), the binding checks against them (varlen_attn_cuda.cpp), the CPU
// emulator runs them (tests/cuda_emu), and uniref._C exports them to Python (csrc/module.cpp), where the
// backend registry of uniref.attention routes every other head dim and dtype to another backend.
// Torch-free: nvcc alone compiles the kernels that include it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "attention/varlen_attn_params.h"

namespace uniref {

// Head dims with a tile configuration in varlen_attn_configs.cuh.
inline constexpr int kCudaAttnHeadDims[] = {32, 64, 128};
inline constexpr const char* kCudaAttnHeadDimsText = "32, 64 and 128";
// Input dtypes: the kernels run tensor-core mma on 16-bit floats, fp32 accumulation.
inline constexpr AttnDtype kCudaAttnDtypes[] = {AttnDtype::kFloat16, AttnDtype::kBFloat16};
inline constexpr const char* kCudaAttnDtypeNames[] = {"float16", "bfloat16"};
inline constexpr const char* kCudaAttnDtypesText = "float16 and bfloat16";

inline constexpr std::size_t kCudaAttnHeadDimCount = sizeof(kCudaAttnHeadDims) / sizeof(kCudaAttnHeadDims[0]);
inline constexpr std::size_t kCudaAttnDtypeCount = sizeof(kCudaAttnDtypes) / sizeof(kCudaAttnDtypes[0]);
static_assert(sizeof(kCudaAttnDtypeNames) / sizeof(kCudaAttnDtypeNames[0]) == kCudaAttnDtypeCount, "one name each");

constexpr bool cuda_attn_dtype_ok(AttnDtype dtype) {
  for (AttnDtype t : kCudaAttnDtypes)
    if (t == dtype) return true;
  return false;
}

constexpr bool cuda_attn_head_dim_ok(int64_t head_dim) {
  for (int d : kCudaAttnHeadDims)
    if (d == head_dim) return true;
  return false;
}

// Calls fn(std::integral_constant<int, D>{}) for the D of kCudaAttnHeadDims that equals head_dim and returns
// its result; `otherwise` when there is none. One instantiation per supported head dim, from the list above.
template <std::size_t I = 0, typename R, typename Fn>
R with_cuda_attn_head_dim(int64_t head_dim, R otherwise, Fn&& fn) {
  if constexpr (I < kCudaAttnHeadDimCount) {
    constexpr int D = kCudaAttnHeadDims[I];
    if (head_dim == D) return fn(std::integral_constant<int, D>{});
    return with_cuda_attn_head_dim<I + 1>(head_dim, otherwise, static_cast<Fn&&>(fn));
  } else {
    return otherwise;
  }
}

}  // namespace uniref
