// CUDA device code for SELF packing. Torch-free (see pack_launch.h).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "pack_params.h"

namespace uniref {
namespace kernels {

// Index of the last entry with key(entry) <= value, over a sorted device array.
template <typename Key>
__device__ __forceinline__ int64_t last_le(int64_t n, int64_t value, Key key) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (key(mid) <= value)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// One warp-row of threads per token (blockDim = (32, tokens per block)); lanes stride the features,
// so writes to the token rows are coalesced; the image-side reads of neighbouring tokens share cache lines.
template <typename T, bool kPack>
__global__ void pack_latents_kernel(const ImageDesc* __restrict__ descs, int64_t num_images, T* tokens,
                                    int32_t* __restrict__ position_ids, int64_t total_tokens, int64_t features,
                                    int64_t p) {
  const int64_t pp = p * p;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; t < total_tokens;
       t += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t k = last_le(num_images, t, [&](int64_t m) { return descs[m].token_offset; });
    const ImageDesc& d = descs[k];
    const int64_t local = t - d.token_offset;
    const int64_t wp = d.width / p;
    const int64_t i = local / wp, j = local - (local / wp) * wp;
    T* row = tokens + t * features;
    for (int64_t f = threadIdx.x; f < features; f += blockDim.x) {
      const int64_t c = f / pp, r = f - c * pp;
      const int64_t y = i * p + r / p, x = j * p + r % p;
      if (kPack)
        row[f] = static_cast<const T*>(d.src)[c * d.stride_c + y * d.stride_h + x * d.stride_w];
      else
        static_cast<T*>(d.dst)[c * d.stride_c + y * d.stride_h + x * d.stride_w] = row[f];
    }
    if (kPack && threadIdx.x == 0) {
      position_ids[3 * t] = d.image_index;
      position_ids[3 * t + 1] = static_cast<int32_t>(i);
      position_ids[3 * t + 2] = static_cast<int32_t>(j);
    }
  }
}

// Rows of the joint layout; V is the widest vector type that divides the row and all pointers.
// cu_seqlens values on the device are not validated (that would synchronize), so a row whose source
// falls outside its stream is skipped rather than read or written out of bounds.
template <typename V, bool kSplit>
__global__ void joint_copy_kernel(JointDesc d, char* joint, const char* text_in, const char* image_in,
                                  char* text_out, char* image_out) {
  const int64_t vecs = d.row_bytes / static_cast<int64_t>(sizeof(V));
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < d.total_rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t b =
        last_le(d.batch, r, [&](int64_t m) { return static_cast<int64_t>(d.cu_text[m]) + d.cu_image[m]; });
    const int64_t local = r - (static_cast<int64_t>(d.cu_text[b]) + d.cu_image[b]);
    const int64_t text_len = d.cu_text[b + 1] - d.cu_text[b];
    const bool is_text = local < text_len;
    const int64_t src_row = is_text ? d.cu_text[b] + local : d.cu_image[b] + (local - text_len);
    if (src_row < 0 || src_row >= (is_text ? d.text_rows : d.image_rows)) continue;
    V* j = reinterpret_cast<V*>(joint + r * d.row_bytes);
    if (kSplit) {
      V* s = reinterpret_cast<V*>((is_text ? text_out : image_out) + src_row * d.row_bytes);
      for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) s[v] = j[v];
    } else {
      const V* s = reinterpret_cast<const V*>((is_text ? text_in : image_in) + src_row * d.row_bytes);
      for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) j[v] = s[v];
    }
  }
}

}  // namespace kernels
}  // namespace uniref
