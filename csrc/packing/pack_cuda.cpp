// Torch bindings of the CUDA packing kernels: checks, allocation, descriptor upload, launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "pack_checks.h"
#include "pack_launch.h"

namespace uniref {
namespace {

// Descriptors travel to the device through a pinned buffer, so the copy overlaps with host work.
at::Tensor upload(const std::vector<ImageDesc>& descs, const at::Device& device) {
  const int64_t bytes = static_cast<int64_t>(descs.size() * sizeof(ImageDesc));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), descs.data(), bytes);
  return host.to(device, /*non_blocking=*/true);
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> pack_latents_cuda(at::TensorList latents, at::IntArrayRef images_per_sample,
                                                     int64_t patch_size) {
  std::vector<ImageDesc> descs;
  const int64_t total = describe_pack(latents, images_per_sample, patch_size, descs);
  const c10::cuda::CUDAGuard guard(latents[0].device());
  const int64_t features = latents[0].size(0) * patch_size * patch_size;
  at::Tensor tokens = at::empty({total, features}, latents[0].options());
  at::Tensor pos = at::empty({total, 3}, latents[0].options().dtype(at::kInt));
  at::Tensor dev = upload(descs, latents[0].device());
  check_launch(launch_pack_latents(reinterpret_cast<const ImageDesc*>(dev.data_ptr()),
                                   static_cast<int64_t>(descs.size()), tokens.data_ptr(), pos.data_ptr<int32_t>(),
                                   total, features, patch_size, latents[0].element_size(),
                                   c10::cuda::getCurrentCUDAStream()),
               "pack_latents");
  return {tokens, pos};
}

std::vector<at::Tensor> unpack_latents_cuda(const at::Tensor& tokens_in, at::IntArrayRef image_sizes,
                                            int64_t patch_size) {
  const c10::cuda::CUDAGuard guard(tokens_in.device());
  const at::Tensor tokens = tokens_in.contiguous();
  std::vector<ImageDesc> descs;
  std::vector<at::Tensor> images = describe_unpack(tokens, image_sizes, patch_size, descs);
  at::Tensor dev = upload(descs, tokens.device());
  check_launch(launch_unpack_latents(reinterpret_cast<const ImageDesc*>(dev.data_ptr()),
                                     static_cast<int64_t>(descs.size()), tokens.data_ptr(), tokens.size(0),
                                     tokens.size(1), patch_size, tokens.element_size(),
                                     c10::cuda::getCurrentCUDAStream()),
               "unpack_latents");
  return images;
}

at::Tensor joint_concat_cuda(const at::Tensor& text_in, const at::Tensor& image_in, const at::Tensor& cu_text,
                             const at::Tensor& cu_image) {
  const c10::cuda::CUDAGuard guard(text_in.device());
  const at::Tensor text = text_in.contiguous(), image = image_in.contiguous();
  const JointDesc d = describe_joint("joint_concat", text, image, cu_text, cu_image);
  at::Tensor joint = at::empty(rows_like(text, d.total_rows), text.options());
  check_launch(launch_joint_copy(d, joint.data_ptr(), text.data_ptr(), image.data_ptr(), /*split=*/false,
                                 c10::cuda::getCurrentCUDAStream()),
               "joint_concat");
  return joint;
}

std::tuple<at::Tensor, at::Tensor> joint_split_cuda(const at::Tensor& joint_in, const at::Tensor& cu_text,
                                                    const at::Tensor& cu_image, int64_t text_total) {
  const c10::cuda::CUDAGuard guard(joint_in.device());
  const at::Tensor joint = joint_in.contiguous();
  auto [text, image] = split_outputs(joint, text_total);
  const JointDesc d = describe_joint("joint_split", text, image, cu_text, cu_image);
  check_launch(launch_joint_copy(d, joint.data_ptr(), text.data_ptr(), image.data_ptr(), /*split=*/true,
                                 c10::cuda::getCurrentCUDAStream()),
               "joint_split");
  return {text, image};
}

}  // namespace

TORCH_LIBRARY_IMPL(uniref, CUDA, m) {
  m.impl("pack_latents", &pack_latents_cuda);
  m.impl("unpack_latents", &unpack_latents_cuda);
  m.impl("joint_concat", &joint_concat_cuda);
  m.impl("joint_split", &joint_split_cuda);
}

}  // namespace uniref
