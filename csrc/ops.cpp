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

  // ---- MSGRPO (Flow-GRPO) math -------------------------------------------------------------------
  // No C++ kernels: uniref/ops/grpo.py registers CPU = the fp32 torch reference
  // (uniref/ops/grpo_reference.py) and CUDA = the Triton kernels (uniref/kernels/grpo.py), plus the
  // fake kernels and the autograd formula. Formulas: docs/flow_grpo.md.
  //
  // Group-normalized advantages. rewards (N, S) float, group_ids (N,) integer keys (equal key = same
  // group), weights (S,) float. normalize_first: normalize each source within its group, then take the
  // weighted sum ("normalize_then_sum"); else weighted sum, then normalize ("sum_then_normalize").
  // batch_std: divide by the whole batch's population std instead of the group's. Then clip to
  // [-clip, clip]. Returns advantages (N,) (float64 for float64 rewards or weights, else float32) and
  // constant (N, K) bool, K = S if normalize_first else 1: whether row i's group holds one value of
  // normalized quantity k (those contribute exactly 0, never NaN).
  m.def(
      "group_advantages(Tensor rewards, Tensor group_ids, Tensor weights, bool normalize_first, "
      "bool batch_std, float eps, float clip) -> (Tensor, Tensor)");
  // Flow-GRPO clipped policy loss with the optional KL to a reference policy. x_next, mean, mean_ref
  // (N, ...) any float dtypes; old_log_prob, advantages, step_std, kl_std (N,). gaussian: the "sde"
  // log-prob (mean over elements of the Gaussian log-density); else the "cps" one, -mean((x - mean)^2).
  // Returns loss (), log_prob (N,), ratio (N,), kl (N,), clip_fraction () and grad_coef (N, 2): per
  // sample, d loss / d mean = grad_coef[:, 0] * (x_next - mean) + grad_coef[:, 1] * (mean - mean_ref),
  // which the backward reads instead of recomputing the reductions. All float32 (float64 if any input is).
  m.def(
      "flow_grpo_loss(Tensor x_next, Tensor mean, Tensor? mean_ref, Tensor old_log_prob, Tensor advantages, "
      "Tensor step_std, Tensor kl_std, float clip_range, float beta, bool gaussian) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // grad_mean = grad_loss * (grad_coef[:, 0] * (x_next - mean) + grad_coef[:, 1] * (mean - mean_ref)),
  // shaped and typed like mean (contiguous). mean_ref = None drops the second term (beta = 0).
  m.def(
      "flow_grpo_loss_backward(Tensor grad_loss, Tensor x_next, Tensor mean, Tensor? mean_ref, "
      "Tensor grad_coef) -> Tensor");
}
