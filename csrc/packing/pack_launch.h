// Host entry points of the CUDA packing kernels (pack_cuda_kernels.cu). Torch-free: raw pointers,
// sizes and a stream, so the kernels compile with nvcc alone and the binding with the host compiler.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "pack_params.h"

namespace uniref {

// `descs` is a device array of `num_images` descriptions sorted by token_offset.
// kPack: images -> tokens (T, features) and position ids (T, 3); else tokens -> images.
cudaError_t launch_pack_latents(const ImageDesc* descs, int64_t num_images, void* tokens, int32_t* position_ids,
                                int64_t total_tokens, int64_t features, int64_t patch_size, size_t element_size,
                                cudaStream_t stream);
cudaError_t launch_unpack_latents(const ImageDesc* descs, int64_t num_images, const void* tokens,
                                  int64_t total_tokens, int64_t features, int64_t patch_size, size_t element_size,
                                  cudaStream_t stream);
// split=false: joint <- [text ; image] per sample; split=true: the reverse.
cudaError_t launch_joint_copy(const JointDesc& desc, void* joint, void* text, void* image, bool split,
                              cudaStream_t stream);

}  // namespace uniref
