// Plain descriptions of a packing job, shared by the CPU kernels, the CUDA kernels and the torch
// bindings. Nothing here knows about torch, so the CUDA kernels compile with nvcc alone.
#pragma once
#include <cstdint>

namespace uniref {

// One image of the batch, as the kernels see it. Sizes are in latent pixels; strides in elements.
struct ImageDesc {
  const void* src;       // pack: the image (any strides); unused by unpack
  void* dst;             // unpack: the output image, contiguous (C, h, w); unused by pack
  int64_t channels;
  int64_t height;
  int64_t width;
  int64_t stride_c;
  int64_t stride_h;
  int64_t stride_w;
  int64_t token_offset;  // first row of this image in the packed tokens
  int64_t row_offset;    // first patch-row of this image among all images' patch-rows
  int32_t image_index;   // index of the image within its sample (0 = target)
};

// Rows of two packed streams interleaved per sample: joint[b] = [text[b] ; image[b]].
struct JointDesc {
  const int32_t* cu_text;   // (B + 1,)
  const int32_t* cu_image;  // (B + 1,)
  int64_t batch;
  int64_t row_bytes;        // bytes per row, identical in all three tensors
  int64_t total_rows;       // rows of the joint tensor
  int64_t text_rows;        // rows of the text stream
  int64_t image_rows;       // rows of the image stream
};

}  // namespace uniref
