// Launchers for the CUDA packing kernels. Torch-free: CI compiles this file with nvcc alone.
#include <algorithm>

#include "pack_kernels.cuh"
#include "pack_launch.h"

namespace uniref {
namespace {

constexpr int kLanes = 32;
constexpr int kRowsPerBlock = 8;
constexpr int64_t kMaxBlocks = 65535;

inline unsigned grid_for(int64_t rows) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((rows + kRowsPerBlock - 1) / kRowsPerBlock,
                                                                      kMaxBlocks)));
}

template <bool kPack>
cudaError_t launch_packing(const ImageDesc* descs, int64_t num_images, void* tokens, int32_t* pos,
                           int64_t total_tokens, int64_t features, int64_t p, size_t element_size,
                           cudaStream_t stream) {
  if (total_tokens == 0) return cudaSuccess;
  const dim3 block(kLanes, kRowsPerBlock);
  const unsigned grid = grid_for(total_tokens);
  switch (element_size) {
    case 1:
      kernels::pack_latents_kernel<uint8_t, kPack><<<grid, block, 0, stream>>>(
          descs, num_images, static_cast<uint8_t*>(tokens), pos, total_tokens, features, p);
      break;
    case 2:
      kernels::pack_latents_kernel<uint16_t, kPack><<<grid, block, 0, stream>>>(
          descs, num_images, static_cast<uint16_t*>(tokens), pos, total_tokens, features, p);
      break;
    case 4:
      kernels::pack_latents_kernel<uint32_t, kPack><<<grid, block, 0, stream>>>(
          descs, num_images, static_cast<uint32_t*>(tokens), pos, total_tokens, features, p);
      break;
    case 8:
      kernels::pack_latents_kernel<uint64_t, kPack><<<grid, block, 0, stream>>>(
          descs, num_images, static_cast<uint64_t*>(tokens), pos, total_tokens, features, p);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename V>
cudaError_t launch_joint(const JointDesc& d, char* joint, char* text, char* image, bool split, cudaStream_t s) {
  const dim3 block(kLanes, kRowsPerBlock);
  const unsigned grid = grid_for(d.total_rows);
  if (split)
    kernels::joint_copy_kernel<V, true><<<grid, block, 0, s>>>(d, joint, nullptr, nullptr, text, image);
  else
    kernels::joint_copy_kernel<V, false><<<grid, block, 0, s>>>(d, joint, text, image, nullptr, nullptr);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_pack_latents(const ImageDesc* descs, int64_t num_images, void* tokens, int32_t* position_ids,
                                int64_t total_tokens, int64_t features, int64_t patch_size, size_t element_size,
                                cudaStream_t stream) {
  return launch_packing<true>(descs, num_images, tokens, position_ids, total_tokens, features, patch_size,
                              element_size, stream);
}

cudaError_t launch_unpack_latents(const ImageDesc* descs, int64_t num_images, const void* tokens,
                                  int64_t total_tokens, int64_t features, int64_t patch_size, size_t element_size,
                                  cudaStream_t stream) {
  return launch_packing<false>(descs, num_images, const_cast<void*>(tokens), nullptr, total_tokens, features,
                               patch_size, element_size, stream);
}

cudaError_t launch_joint_copy(const JointDesc& d, void* joint, void* text, void* image, bool split,
                              cudaStream_t stream) {
  if (d.total_rows == 0 || d.row_bytes == 0) return cudaSuccess;
  // The widest access that divides the row and every base address.
  uintptr_t bits = static_cast<uintptr_t>(d.row_bytes) | reinterpret_cast<uintptr_t>(joint) |
                   reinterpret_cast<uintptr_t>(text) | reinterpret_cast<uintptr_t>(image);
  char* j = static_cast<char*>(joint);
  char* t = static_cast<char*>(text);
  char* i = static_cast<char*>(image);
  if (bits % 16 == 0) return launch_joint<uint4>(d, j, t, i, split, stream);
  if (bits % 8 == 0) return launch_joint<uint2>(d, j, t, i, split, stream);
  if (bits % 4 == 0) return launch_joint<uint32_t>(d, j, t, i, split, stream);
  if (bits % 2 == 0) return launch_joint<uint16_t>(d, j, t, i, split, stream);
  return launch_joint<uint8_t>(d, j, t, i, split, stream);
}

}  // namespace uniref
