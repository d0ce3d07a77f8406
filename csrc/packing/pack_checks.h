// Argument checks and job descriptions shared by the CPU and CUDA bindings of the packing ops.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "pack_params.h"

namespace uniref {

// Validates pack_latents' arguments and describes each image. Returns the total token count.
inline int64_t describe_pack(at::TensorList latents, at::IntArrayRef images_per_sample, int64_t p,
                             std::vector<ImageDesc>& descs) {
  TORCH_CHECK(p >= 1, "pack_latents: patch_size must be >= 1, got ", p);
  TORCH_CHECK(!latents.empty(), "pack_latents: latents is empty; pass at least one image (the target)");
  int64_t expected = 0;
  for (int64_t n : images_per_sample) {
    TORCH_CHECK(n >= 1, "pack_latents: every sample needs at least one image (its target); images_per_sample has ",
                n);
    expected += n;
  }
  TORCH_CHECK(expected == static_cast<int64_t>(latents.size()), "pack_latents: images_per_sample sums to ", expected,
              " but ", latents.size(), " latents were given");
  const at::Tensor& first = latents[0];
  const int64_t channels = first.dim() == 3 ? first.size(0) : -1;
  descs.clear();
  descs.reserve(latents.size());
  int64_t tokens = 0, rows = 0;
  size_t sample = 0;
  int64_t index_in_sample = 0;
  for (size_t k = 0; k < latents.size(); ++k) {
    const at::Tensor& x = latents[k];
    TORCH_CHECK(x.dim() == 3, "pack_latents: latents[", k, "] must be (C, h, w), got shape ", x.sizes());
    TORCH_CHECK(x.size(0) == channels, "pack_latents: latents[", k, "] has ", x.size(0),
                " channels but latents[0] has ", channels, "; all images of a batch share the channel count");
    TORCH_CHECK(x.scalar_type() == first.scalar_type(), "pack_latents: latents[", k, "] is ", x.scalar_type(),
                " but latents[0] is ", first.scalar_type(), "; cast them to one dtype");
    TORCH_CHECK(x.device() == first.device(), "pack_latents: latents[", k, "] is on ", x.device(),
                " but latents[0] is on ", first.device(), "; move them to one device");
    TORCH_CHECK(x.size(1) > 0 && x.size(2) > 0 && x.size(1) % p == 0 && x.size(2) % p == 0,
                "pack_latents: latents[", k, "] has spatial size ", x.size(1), "x", x.size(2),
                ", which is not a positive multiple of patch_size=", p,
                "; plan image sizes with uniref.plan_reference_sizes (multiple = VAE factor x patch)");
    ImageDesc d{};
    d.src = x.data_ptr();
    d.channels = channels;
    d.height = x.size(1);
    d.width = x.size(2);
    d.stride_c = x.stride(0);
    d.stride_h = x.stride(1);
    d.stride_w = x.stride(2);
    d.token_offset = tokens;
    d.row_offset = rows;
    d.image_index = static_cast<int32_t>(index_in_sample);
    descs.push_back(d);
    tokens += (d.height / p) * (d.width / p);
    rows += d.height / p;
    if (++index_in_sample == images_per_sample[sample]) {
      ++sample;
      index_in_sample = 0;
    }
  }
  return tokens;
}

// Validates unpack_latents' arguments, allocates the output images and describes them.
inline std::vector<at::Tensor> describe_unpack(const at::Tensor& tokens, at::IntArrayRef image_sizes, int64_t p,
                                               std::vector<ImageDesc>& descs) {
  TORCH_CHECK(p >= 1, "unpack_latents: patch_size must be >= 1, got ", p);
  TORCH_CHECK(tokens.dim() == 2, "unpack_latents: tokens must be (T, C*p*p), got shape ", tokens.sizes());
  TORCH_CHECK(tokens.size(1) % (p * p) == 0, "unpack_latents: tokens have ", tokens.size(1),
              " features, not a multiple of patch_size^2=", p * p);
  TORCH_CHECK(!image_sizes.empty() && image_sizes.size() % 2 == 0,
              "unpack_latents: image_sizes must be [h0, w0, h1, w1, ...], got ", image_sizes.size(), " numbers");
  const int64_t channels = tokens.size(1) / (p * p);
  std::vector<at::Tensor> images;
  images.reserve(image_sizes.size() / 2);
  descs.clear();
  int64_t offset = 0, rows = 0;
  for (size_t k = 0; k < image_sizes.size() / 2; ++k) {
    const int64_t h = image_sizes[2 * k], w = image_sizes[2 * k + 1];
    TORCH_CHECK(h > 0 && w > 0 && h % p == 0 && w % p == 0, "unpack_latents: image ", k, " has size ", h, "x", w,
                ", not a positive multiple of patch_size=", p);
    at::Tensor img = at::empty({channels, h, w}, tokens.options());
    ImageDesc d{};
    d.dst = img.data_ptr();
    d.channels = channels;
    d.height = h;
    d.width = w;
    d.stride_c = h * w;
    d.stride_h = w;
    d.stride_w = 1;
    d.token_offset = offset;
    d.row_offset = rows;
    descs.push_back(d);
    images.push_back(std::move(img));
    offset += (h / p) * (w / p);
    rows += h / p;
  }
  TORCH_CHECK(offset == tokens.size(0), "unpack_latents: image_sizes describe ", offset, " tokens but tokens has ",
              tokens.size(0), " rows");
  return images;
}

// Checks one cu_seqlens tensor's metadata (and, for CPU tensors, its values) against a row count.
inline void check_cu_seqlens(const at::Tensor& cu, const char* op, const char* name, int64_t total,
                             const at::Device& device) {
  TORCH_CHECK(cu.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1, op, ": ", name, " must be 1-D of shape (B+1,), got ", cu.sizes());
  TORCH_CHECK(cu.device() == device, op, ": ", name, " is on ", cu.device(), " but the data is on ", device);
  TORCH_CHECK(cu.is_contiguous(), op, ": ", name, " must be contiguous");
  if (cu.device().is_cpu()) {
    const int32_t* c = cu.data_ptr<int32_t>();
    TORCH_CHECK(c[0] == 0, op, ": ", name, "[0] must be 0, got ", c[0]);
    for (int64_t b = 0; b + 1 < cu.size(0); ++b)
      TORCH_CHECK(c[b + 1] >= c[b], op, ": ", name, " must be non-decreasing, but ", name, "[", b + 1,
                  "]=", c[b + 1], " < ", name, "[", b, "]=", c[b]);
    TORCH_CHECK(c[cu.size(0) - 1] == total, op, ": ", name, "[-1]=", c[cu.size(0) - 1],
                " must equal the number of rows, ", total);
  }
}

// Validates joint_concat / joint_split streams; returns the shared description.
inline JointDesc describe_joint(const char* op, const at::Tensor& text, const at::Tensor& image,
                                const at::Tensor& cu_text, const at::Tensor& cu_image) {
  TORCH_CHECK(text.dim() >= 1 && image.dim() == text.dim() && text.sizes().slice(1) == image.sizes().slice(1), op,
              ": text and image streams must share their trailing shape, got ", text.sizes(), " and ",
              image.sizes());
  TORCH_CHECK(text.scalar_type() == image.scalar_type(), op, ": text is ", text.scalar_type(), " but image is ",
              image.scalar_type());
  TORCH_CHECK(text.device() == image.device(), op, ": text is on ", text.device(), " but image is on ",
              image.device());
  TORCH_CHECK(cu_text.numel() == cu_image.numel(), op, ": cu_seqlens_text has ", cu_text.numel(),
              " entries but cu_seqlens_image has ", cu_image.numel(), "; both need B+1");
  check_cu_seqlens(cu_text, op, "cu_seqlens_text", text.size(0), text.device());
  check_cu_seqlens(cu_image, op, "cu_seqlens_image", image.size(0), text.device());
  JointDesc d{};
  d.cu_text = cu_text.data_ptr<int32_t>();
  d.cu_image = cu_image.data_ptr<int32_t>();
  d.batch = cu_text.size(0) - 1;
  d.row_bytes = c10::multiply_integers(text.sizes().slice(1)) * static_cast<int64_t>(text.element_size());
  d.total_rows = text.size(0) + image.size(0);
  d.text_rows = text.size(0);
  d.image_rows = image.size(0);
  return d;
}

// Shape of a packed stream with `rows` rows and `like`'s trailing dims.
inline std::vector<int64_t> rows_like(const at::Tensor& like, int64_t rows) {
  std::vector<int64_t> shape(like.sizes().begin(), like.sizes().end());
  shape[0] = rows;
  return shape;
}

// Checks joint_split's text_total and allocates its two outputs.
inline std::pair<at::Tensor, at::Tensor> split_outputs(const at::Tensor& joint, int64_t text_total) {
  TORCH_CHECK(joint.dim() >= 1, "joint_split: joint must have a row dimension, got shape ", joint.sizes());
  TORCH_CHECK(text_total >= 0 && text_total <= joint.size(0), "joint_split: text_total=", text_total,
              " must lie in [0, ", joint.size(0), "] (the rows of joint)");
  return {at::empty(rows_like(joint, text_total), joint.options()),
          at::empty(rows_like(joint, joint.size(0) - text_total), joint.options())};
}

}  // namespace uniref
