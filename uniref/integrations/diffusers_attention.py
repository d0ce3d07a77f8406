"""Runs the joint attention of diffusers' Qwen-Image MMDiT through `uniref.varlen_attention`.

`VarlenJointAttnProcessor` is a drop-in for diffusers' ``QwenDoubleStreamAttnProcessor2_0`` (the joint
text + image attention of every ``QwenImageTransformerBlock``): same projections, QK norms and RoPE,
only the attention differs. `use_varlen_attention(model)` installs it on a model.

diffusers' attention dispatcher (``diffusers.models.attention_dispatch``) keys its backends by a closed
enum, so a backend cannot be registered from outside diffusers; a processor is the supported hook.

Two input layouts:

* **Padded batch**, diffusers' own: ``hidden_states (B, S_img, C)``, ``encoder_hidden_states (B, S_txt, C)``
  and optionally ``encoder_hidden_states_mask (B, S_txt)`` (True / 1 = a real text token). Instead of
  masking the padded text keys, the processor drops them: every query row (padded ones too, as diffusers
  computes them) attends to its sample's real keys only -- the default processor's result, without the
  attention mask that pushes SDPA off its fast kernels. Dropping keys reads the mask on the host (one
  device sync per attention call); without a mask nothing is read.
* **Packed** (SELF): pass ``cu_seqlens_text`` and ``cu_seqlens_image`` (int32 ``(B + 1,)``) and, to avoid a
  device sync, ``max_seqlen`` (the longest joint sequence) through the model's ``attention_kwargs``. Then
  the batch dimension is 1 and each stream holds all samples packed, sample after sample; sample b's
  joint sequence is ``[text_b ; image_b]`` (`uniref.concat_joint`) and attends only to itself. The
  rotary embeddings must then be per token of the packed streams: ``image_rotary_emb = (img_freqs
  (T_img, D/2), txt_freqs (T_txt, D/2))`` -- diffusers' own ``QwenEmbedRope`` computes them for one
  sample's layout, so a packed batch of several samples needs per-sample frequencies concatenated.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from uniref.attention import varlen_attention
from uniref.packing import concat_joint, split_joint

__all__ = ["VarlenJointAttnProcessor", "use_varlen_attention"]


class VarlenJointAttnProcessor:
    """Qwen-Image joint attention (diffusers' ``QwenDoubleStreamAttnProcessor2_0``) over `varlen_attention`.

    Args:
        backend: passed to `uniref.varlen_attention` (``"auto"``: uniref's kernel on CPU and on CUDA
            when it applies, one SDPA call per sample for long samples on CUDA: see
            `uniref.attention.auto_backend`).
    """

    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        encoder_hidden_states_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
        cu_seqlens_text: Tensor | None = None,
        cu_seqlens_image: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Returns ``(image_out, text_out)`` shaped like ``hidden_states`` and ``encoder_hidden_states``."""
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if encoder_hidden_states is None:
            raise ValueError("VarlenJointAttnProcessor needs encoder_hidden_states (the text stream)")
        if attention_mask is not None:
            raise ValueError(
                "VarlenJointAttnProcessor does not take an attention_mask; pass encoder_hidden_states_mask "
                "(padded batch) or cu_seqlens_text / cu_seqlens_image (packed batch)"
            )
        packed = cu_seqlens_text is not None or cu_seqlens_image is not None
        if packed and (cu_seqlens_text is None or cu_seqlens_image is None):
            raise ValueError("VarlenJointAttnProcessor: pass both cu_seqlens_text and cu_seqlens_image, or neither")
        if packed and (hidden_states.shape[0] != 1 or encoder_hidden_states_mask is not None):
            raise ValueError(
                "VarlenJointAttnProcessor: with cu_seqlens the streams are packed, batch dimension 1 and no "
                f"encoder_hidden_states_mask; got hidden_states {tuple(hidden_states.shape)} and a mask "
                f"{'set' if encoder_hidden_states_mask is not None else 'unset'}"
            )

        head_dim = attn.inner_dim // attn.heads

        def heads(x: Tensor) -> Tensor:
            return x.unflatten(-1, (-1, head_dim))

        img_q, img_k, img_v = (heads(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        txt = encoder_hidden_states
        txt_q, txt_k, txt_v = (heads(proj(txt)) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_q = apply_rotary_emb_qwen(img_q, img_freqs, use_real=False)
            img_k = apply_rotary_emb_qwen(img_k, img_freqs, use_real=False)
            txt_q = apply_rotary_emb_qwen(txt_q, txt_freqs, use_real=False)
            txt_k = apply_rotary_emb_qwen(txt_k, txt_freqs, use_real=False)

        if packed:
            txt_out, img_out = self._packed(
                (txt_q[0], txt_k[0], txt_v[0]), (img_q[0], img_k[0], img_v[0]), cu_seqlens_text, cu_seqlens_image,
                max_seqlen,
            )  # fmt: skip
            txt_out, img_out = txt_out[None], img_out[None]
        else:
            joint = self._padded(
                torch.cat([txt_q, img_q], dim=1), torch.cat([txt_k, img_k], dim=1), torch.cat([txt_v, img_v], dim=1),
                encoder_hidden_states_mask,
            )  # fmt: skip
            txt_out, img_out = joint[:, : encoder_hidden_states.shape[1]], joint[:, encoder_hidden_states.shape[1] :]

        img_out = attn.to_out[0](img_out.to(img_q.dtype).contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)  # dropout
        txt_out = attn.to_add_out(txt_out.to(txt_q.dtype).contiguous())
        return img_out, txt_out

    def _padded(self, q: Tensor, k: Tensor, v: Tensor, text_mask: Tensor | None) -> Tensor:
        """(B, S, H, D) joint q/k/v, text first -> (B, S, H * D); each sample attends to its real keys."""
        batch, seq, heads, dim = q.shape
        cu_q = torch.arange(batch + 1, device=q.device, dtype=torch.int32) * seq
        q, k, v = (t.reshape(batch * seq, heads, dim) for t in (q, k, v))
        cu_k = cu_q
        if text_mask is not None:
            image_keys = torch.ones(batch, seq - text_mask.shape[1], dtype=torch.bool, device=q.device)
            keep = torch.cat([text_mask.to(device=q.device, dtype=torch.bool), image_keys], dim=1)
            k, v = k[keep.flatten()], v[keep.flatten()]
            cu_k = torch.nn.functional.pad(keep.sum(1).cumsum(0), (1, 0)).to(torch.int32)
        # seq bounds every sample's key count: no need to read the true maximum from the device.
        out = varlen_attention(q, k, v, cu_q, cu_k, seq, seq, backend=self.backend)
        return out.reshape(batch, seq, heads * dim)

    def _packed(self, txt, img, cu_txt: Tensor, cu_img: Tensor, max_seqlen: int | None) -> tuple[Tensor, Tensor]:
        """Packed streams (T, H, D) -> packed (T_txt, H * D), (T_img, H * D) outputs."""
        (q, cu), (k, _), (v, _) = (concat_joint(t, cu_txt, i, cu_img) for t, i in zip(txt, img))
        if max_seqlen is None:
            max_seqlen = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
        out = varlen_attention(q, k, v, cu, cu, max_seqlen, max_seqlen, backend=self.backend)
        return split_joint(out.flatten(1), cu_txt, cu_img, txt[0].shape[0])


def use_varlen_attention(model: nn.Module, backend: str = "auto") -> int:
    """Installs `VarlenJointAttnProcessor` on every Qwen-Image joint attention of `model` (e.g. a
    ``diffusers.QwenImageTransformer2DModel``); returns how many it replaced.

    Raises:
        ValueError: the model has no attention module running ``QwenDoubleStreamAttnProcessor2_0``.
    """
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    replaced = 0
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, (QwenDoubleStreamAttnProcessor2_0, VarlenJointAttnProcessor)):
            module.set_processor(VarlenJointAttnProcessor(backend))
            replaced += 1
    if replaced == 0:
        raise ValueError(
            f"use_varlen_attention: {type(model).__name__} has no attention module running diffusers' "
            "QwenDoubleStreamAttnProcessor2_0 (Qwen-Image joint attention); nothing to replace"
        )
    return replaced
