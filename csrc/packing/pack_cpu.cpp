// CPU kernels for SELF packing. The unit of work is one patch-row of one image: its p source rows
// per channel are read contiguously and scattered into a (w/p, C*p*p) token tile that stays in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "pack_checks.h"

namespace uniref {
namespace {

// The image holding global patch-row `row` (descs sorted by row_offset).
inline size_t image_of_row(const std::vector<ImageDesc>& descs, int64_t row) {
  auto it = std::upper_bound(descs.begin(), descs.end(), row,
                             [](int64_t r, const ImageDesc& d) { return r < d.row_offset; });
  return static_cast<size_t>(it - descs.begin()) - 1;
}

// A patch-row of one image is a transpose: its C*p source rows (channel c, pixel row pi), each
// holding w/p chunks of p contiguous pixels, become w/p tokens of C*p chunks. With unit pixel stride
// a chunk moves as one word of p * sizeof(element) bytes.
template <size_t kBytes>
struct Chunk {
  unsigned char bytes[kBytes];
};

// Transposes rows x cols chunks, src(r, j) -> dst(j, r), in square blocks so both sides stay in cache.
template <typename C, bool kPack>
inline void transpose_chunks(C* tile, C* const* rows_ptr, int64_t rows, int64_t cols) {
  constexpr int64_t kBlock = 8;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    const int64_t r1 = std::min(rows, r0 + kBlock);
    for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
      const int64_t j1 = std::min(cols, j0 + kBlock);
      for (int64_t r = r0; r < r1; ++r) {
        C* row = rows_ptr[r];
        for (int64_t j = j0; j < j1; ++j) {
          if constexpr (kPack)
            tile[j * rows + r] = row[j];
          else
            row[j] = tile[j * rows + r];
        }
      }
    }
  }
}

template <bool kPack>
inline void transpose_by_width(size_t bytes, void* tile, void* const* rows, int64_t n, int64_t cols) {
  switch (bytes) {
    case 1: return transpose_chunks<Chunk<1>, kPack>(static_cast<Chunk<1>*>(tile), reinterpret_cast<Chunk<1>* const*>(rows), n, cols);
    case 2: return transpose_chunks<Chunk<2>, kPack>(static_cast<Chunk<2>*>(tile), reinterpret_cast<Chunk<2>* const*>(rows), n, cols);
    case 4: return transpose_chunks<Chunk<4>, kPack>(static_cast<Chunk<4>*>(tile), reinterpret_cast<Chunk<4>* const*>(rows), n, cols);
    case 8: return transpose_chunks<Chunk<8>, kPack>(static_cast<Chunk<8>*>(tile), reinterpret_cast<Chunk<8>* const*>(rows), n, cols);
    default: return transpose_chunks<Chunk<16>, kPack>(static_cast<Chunk<16>*>(tile), reinterpret_cast<Chunk<16>* const*>(rows), n, cols);
  }
}

template <typename T, bool kPack>
void copy_patch_rows(const std::vector<ImageDesc>& descs, T* tokens, int32_t* position_ids, int64_t p,
                     int64_t total_rows) {
  const int64_t pp = p * p;
  at::parallel_for(0, total_rows, 1, [&](int64_t begin, int64_t end) {
    size_t k = image_of_row(descs, begin);
    std::vector<T*> rows_ptr;
    for (int64_t row = begin; row < end; ++row) {
      while (row >= descs[k].row_offset + descs[k].height / p) ++k;
      const ImageDesc& d = descs[k];
      const int64_t i = row - d.row_offset;  // patch row within the image
      const int64_t wp = d.width / p;
      const int64_t features = d.channels * pp;
      T* tile = tokens + (d.token_offset + i * wp) * features;
      T* base = kPack ? const_cast<T*>(static_cast<const T*>(d.src)) : static_cast<T*>(d.dst);
      if (d.stride_w == 1 && p * sizeof(T) <= 16 && ((p * sizeof(T)) & (p * sizeof(T) - 1)) == 0) {
        rows_ptr.resize(d.channels * p);
        for (int64_t c = 0; c < d.channels; ++c)
          for (int64_t pi = 0; pi < p; ++pi) rows_ptr[c * p + pi] = base + c * d.stride_c + (i * p + pi) * d.stride_h;
        const int64_t n = d.channels * p;
        transpose_by_width<kPack>(p * sizeof(T), tile, reinterpret_cast<void* const*>(rows_ptr.data()), n, wp);
      } else {
        for (int64_t c = 0; c < d.channels; ++c) {
          for (int64_t pi = 0; pi < p; ++pi) {
            T* img = base + c * d.stride_c + (i * p + pi) * d.stride_h;
            T* out = tile + c * pp + pi * p;
            const int64_t sw = d.stride_w;
            for (int64_t j = 0; j < wp; ++j)
              for (int64_t pj = 0; pj < p; ++pj) {
                if constexpr (kPack)
                  out[j * features + pj] = img[(j * p + pj) * sw];
                else
                  img[(j * p + pj) * sw] = out[j * features + pj];
              }
          }
        }
      }
      if (kPack) {
        int32_t* pos = position_ids + 3 * (d.token_offset + i * wp);
        for (int64_t j = 0; j < wp; ++j) {
          pos[3 * j] = d.image_index;
          pos[3 * j + 1] = static_cast<int32_t>(i);
          pos[3 * j + 2] = static_cast<int32_t>(j);
        }
      }
    }
  });
}

// Packing moves bytes, so one instantiation per element size serves every dtype.
template <bool kPack>
void dispatch_by_size(size_t element_size, const std::vector<ImageDesc>& descs, void* tokens, int32_t* pos,
                      int64_t p, int64_t rows) {
  switch (element_size) {
    case 1: return copy_patch_rows<uint8_t, kPack>(descs, static_cast<uint8_t*>(tokens), pos, p, rows);
    case 2: return copy_patch_rows<uint16_t, kPack>(descs, static_cast<uint16_t*>(tokens), pos, p, rows);
    case 4: return copy_patch_rows<uint32_t, kPack>(descs, static_cast<uint32_t*>(tokens), pos, p, rows);
    case 8: return copy_patch_rows<uint64_t, kPack>(descs, static_cast<uint64_t*>(tokens), pos, p, rows);
    default: TORCH_CHECK(false, "uniref packing: unsupported element size ", element_size);
  }
}

int64_t total_patch_rows(const std::vector<ImageDesc>& descs, int64_t p) {
  return descs.back().row_offset + descs.back().height / p;
}

std::tuple<at::Tensor, at::Tensor> pack_latents_cpu(at::TensorList latents, at::IntArrayRef images_per_sample,
                                                    int64_t patch_size) {
  std::vector<ImageDesc> descs;
  const int64_t total = describe_pack(latents, images_per_sample, patch_size, descs);
  const int64_t features = latents[0].size(0) * patch_size * patch_size;
  at::Tensor tokens = at::empty({total, features}, latents[0].options());
  at::Tensor pos = at::empty({total, 3}, latents[0].options().dtype(at::kInt));
  dispatch_by_size<true>(latents[0].element_size(), descs, tokens.data_ptr(), pos.data_ptr<int32_t>(), patch_size,
                         total_patch_rows(descs, patch_size));
  return {tokens, pos};
}

std::vector<at::Tensor> unpack_latents_cpu(const at::Tensor& tokens_in, at::IntArrayRef image_sizes,
                                           int64_t patch_size) {
  std::vector<ImageDesc> descs;
  const at::Tensor tokens = tokens_in.contiguous();
  std::vector<at::Tensor> images = describe_unpack(tokens, image_sizes, patch_size, descs);
  dispatch_by_size<false>(tokens.element_size(), descs, tokens.data_ptr(), nullptr, patch_size,
                          total_patch_rows(descs, patch_size));
  return images;
}

// Both directions of the joint layout are 2B contiguous block copies, split into pieces for threads.
void joint_copy(const JointDesc& d, char* joint, char* text, char* image, bool split) {
  struct Block {
    char* joint;
    char* stream;
    int64_t bytes;
  };
  std::vector<Block> blocks;
  constexpr int64_t kPiece = 1 << 18;
  auto add = [&](char* j, char* s, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += kPiece) blocks.push_back({j + o, s + o, std::min(kPiece, bytes - o)});
  };
  for (int64_t b = 0; b < d.batch; ++b) {
    const int64_t t0 = d.cu_text[b], t1 = d.cu_text[b + 1], i0 = d.cu_image[b], i1 = d.cu_image[b + 1];
    char* out = joint + (t0 + i0) * d.row_bytes;
    add(out, text + t0 * d.row_bytes, (t1 - t0) * d.row_bytes);
    add(out + (t1 - t0) * d.row_bytes, image + i0 * d.row_bytes, (i1 - i0) * d.row_bytes);
  }
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      if (split)
        std::memcpy(blocks[k].stream, blocks[k].joint, blocks[k].bytes);
      else
        std::memcpy(blocks[k].joint, blocks[k].stream, blocks[k].bytes);
    }
  });
}

at::Tensor joint_concat_cpu(const at::Tensor& text_in, const at::Tensor& image_in, const at::Tensor& cu_text,
                            const at::Tensor& cu_image) {
  const at::Tensor text = text_in.contiguous(), image = image_in.contiguous();
  const JointDesc d = describe_joint("joint_concat", text, image, cu_text, cu_image);
  at::Tensor joint = at::empty(rows_like(text, d.total_rows), text.options());
  joint_copy(d, static_cast<char*>(joint.data_ptr()), static_cast<char*>(text.data_ptr()),
             static_cast<char*>(image.data_ptr()), /*split=*/false);
  return joint;
}

std::tuple<at::Tensor, at::Tensor> joint_split_cpu(const at::Tensor& joint_in, const at::Tensor& cu_text,
                                                   const at::Tensor& cu_image, int64_t text_total) {
  const at::Tensor joint = joint_in.contiguous();
  auto [text, image] = split_outputs(joint, text_total);
  const JointDesc d = describe_joint("joint_split", text, image, cu_text, cu_image);
  joint_copy(d, static_cast<char*>(joint.data_ptr()), static_cast<char*>(text.data_ptr()),
             static_cast<char*>(image.data_ptr()), /*split=*/true);
  return {text, image};
}

}  // namespace

TORCH_LIBRARY_IMPL(uniref, CPU, m) {
  m.impl("pack_latents", &pack_latents_cpu);
  m.impl("unpack_latents", &unpack_latents_cpu);
  m.impl("joint_concat", &joint_concat_cpu);
  m.impl("joint_split", &joint_split_cpu);
}

}  // namespace uniref
