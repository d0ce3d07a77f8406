// Every uniref op's schema, in one place. Implementations live next to their kernels
// (csrc/<op>/<op>_cpu.cpp, <op>_cuda.cpp) or in Python (uniref/ops/) for the Triton-backed ops;
// fake kernels and autograd formulas are registered in uniref/ops/. The Python module entry point
// is csrc/module.cpp.
#include <torch/library.h>

TORCH_LIBRARY(uniref, m) {
  // SELF packing: images (C, h, w) of all samples, in order -> tokens (T, C*p*p) and
  // position ids (T, 3) int32 = (image index within its sample, patch row, patch col).
  m.def("pack_latents(Tensor[] latents, int[] images_per_sample, int patch_size) -> (Tensor, Tensor)");
  // Inverse of pack_latents. image_sizes = [h0, w0, h1, w1, ...] in latent pixels.
  m.def("unpack_latents(Tensor tokens, int[] image_sizes, int patch_size) -> Tensor[]");
  // Per sample b: joint[b] = [text[b] ; image[b]] (rows), over packed streams with int32 offsets.
  m.def("joint_concat(Tensor text, Tensor image, Tensor cu_seqlens_text, Tensor cu_seqlens_image) -> Tensor");
  m.def(
      "joint_split(Tensor joint, Tensor cu_seqlens_text, Tensor cu_seqlens_image, int text_total) -> "
      "(Tensor, Tensor)");

  // Block-diagonal (per-sample) attention over packed sequences, non-causal.
  // q (Tq, H, D), k/v (Tk, H, D), int32 cu_seqlens (B+1,). Returns out (Tq, H, D) and the fp32
  // log-sum-exp (H, Tq) of the scaled scores (natural log), which the backward recomputes from.
  m.def(
      "varlen_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float softmax_scale) -> (Tensor, Tensor)");
  m.def(
      "varlen_attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale) -> "
      "(Tensor, Tensor, Tensor)");
}
