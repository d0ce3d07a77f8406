"""UniRefTransformer2DModel: the Qwen-Image dual-stream MMDiT over packed SELF sequences.

Read top to bottom: rotary positions from the SELF layout -> timestep embedding -> N dual-stream
blocks (per-stream adaLN modulation, joint varlen attention over [text ; target ; ref_1 ; ...] of
each sample, per-stream MLP) -> adaLN output norm -> projection of the *target* tokens only.

The parameter names are those of diffusers' `QwenImageTransformer2DModel`, so its weights load as
they are (`from_qwenimage`). What differs is the data layout: every stream is packed without padding
(`(T, features)` plus int32 `cu_seqlens`), so samples with different numbers and sizes of references
and different prompt lengths run in one forward, and attention never crosses samples.
"""

from __future__ import annotations

import json
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import RMSNorm
from torch import Tensor, nn

from uniref.packing import PackedLatents, SequenceLayout, concat_joint, cu_seqlens_from_lengths, split_joint

ROPE_SCHEMES = ("msrope", "corner")


# --------------------------------------------------------------------------------------------
# Rotary positions from the SELF layout
# --------------------------------------------------------------------------------------------


def rope_positions(
    layout: SequenceLayout, text_lengths: Sequence[int], scheme: str = "msrope"
) -> tuple[Tensor, Tensor]:
    """3-D rotary positions (frame, row, col) of every image token and every text token.

    Schemes:
        ``"msrope"`` (Qwen-Image's MSRoPE, the default): frame = image index in the sample (target 0,
        reference k -> k); rows and cols centred on the image (``row - ceil(h/2)``); text token t of a
        sample at ``m + t`` on all three axes, where m is the sample's largest ``max(h//2, w//2)``.
        ``"corner"``: rows and cols counted from the image's top-left corner, text after the largest
        image side. Both keep images apart by their frame index.

    Returns ``(image_positions (T_img, 3), text_positions (T_txt, 3))`` as float32 on the tokens' device.
    """
    if scheme not in ROPE_SCHEMES:
        raise ValueError(f"rope scheme must be one of {ROPE_SCHEMES}, got {scheme!r}")
    if isinstance(layout, PackedLatents):
        layout = layout.layout
    device = layout.position_ids.device
    p = layout.patch_size
    offsets, counts, text_start = [], [], []
    for sample in layout.image_sizes:
        grid = [(h // p, w // p) for h, w in sample]
        if scheme == "msrope":
            offsets += [(hp - hp // 2, wp - wp // 2) for hp, wp in grid]
            text_start.append(max(max(hp // 2, wp // 2) for hp, wp in grid))
        else:
            offsets += [(0, 0)] * len(grid)
            text_start.append(max(max(hp, wp) for hp, wp in grid))
        counts += [hp * wp for hp, wp in grid]
    per_token = torch.repeat_interleave(
        torch.tensor(offsets, dtype=torch.int32, device=device),
        torch.tensor(counts, device=device),
        dim=0,
        output_size=layout.position_ids.shape[0],
    )
    image_pos = layout.position_ids.clone()
    image_pos[:, 1:] -= per_token
    lengths = torch.tensor(list(text_lengths), device=device)
    total = int(sum(text_lengths))
    starts = torch.cumsum(lengths, 0) - lengths
    t = torch.arange(total, device=device) - torch.repeat_interleave(starts, lengths, output_size=total)
    t = t + torch.repeat_interleave(torch.tensor(text_start, device=device), lengths, output_size=total)
    return image_pos.float(), t[:, None].expand(total, 3).float()


class RotaryEmbedding3D(nn.Module):
    """cos/sin tables of 3-axis RoPE: axis k rotates ``axes_dim[k]`` channels of each head."""

    def __init__(self, axes_dim: Sequence[int], theta: float = 10000.0):
        super().__init__()
        if any(d % 2 for d in axes_dim):
            raise ValueError(f"axes_dims_rope must be even, got {tuple(axes_dim)}")
        self.axes_dim = tuple(axes_dim)
        self.theta = theta

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (T, 3) float32 -> cos, sin (T, sum(axes_dim) / 2), float32."""
        angles = []
        for axis, dim in enumerate(self.axes_dim):
            inv = 1.0 / torch.pow(
                self.theta, torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32).div(dim)
            )
            angles.append(positions[:, axis, None] * inv[None])
        angles = torch.cat(angles, dim=-1)
        return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates channel pairs (2i, 2i+1) of x (T, H, D) by per-token angles, in float32."""
    xf = x.float().unflatten(-1, (-1, 2))
    re, im = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, None], sin[:, None]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


def modulate(x: Tensor, params: Tensor, segment: Tensor) -> tuple[Tensor, Tensor]:
    """adaLN on a packed stream: params (S, 3D) = (shift, scale, gate) per segment, segment (T,) ids."""
    shift, scale, gate = params.index_select(0, segment).chunk(3, dim=-1)
    return x * (1 + scale) + shift, gate


class JointAttention(nn.Module):
    """Joint attention of the two streams of every sample: QK RMSNorm, RoPE, varlen attention."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps=eps), RMSNorm(head_dim, eps=eps)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim, eps=eps), RMSNorm(head_dim, eps=eps)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.to_add_out = nn.Linear(inner, dim)

    def forward(self, img: Tensor, txt: Tensor, derived: "_Derived", backend: str) -> tuple[Tensor, Tensor]:
        from uniref import varlen_attention

        heads = lambda t: t.unflatten(-1, (self.heads, self.head_dim))  # noqa: E731
        img_q = apply_rope(self.norm_q(heads(self.to_q(img))), *derived.img_rope)
        img_k = apply_rope(self.norm_k(heads(self.to_k(img))), *derived.img_rope)
        img_v = heads(self.to_v(img))
        txt_q = apply_rope(self.norm_added_q(heads(self.add_q_proj(txt))), *derived.txt_rope)
        txt_k = apply_rope(self.norm_added_k(heads(self.add_k_proj(txt))), *derived.txt_rope)
        txt_v = heads(self.add_v_proj(txt))

        q, cu = concat_joint(txt_q, derived.cu_txt, img_q, derived.cu_img)
        k, _ = concat_joint(txt_k, derived.cu_txt, img_k, derived.cu_img)
        v, _ = concat_joint(txt_v, derived.cu_txt, img_v, derived.cu_img)
        out = varlen_attention(q, k, v, cu, cu, derived.max_joint, derived.max_joint, backend=backend)
        txt_out, img_out = split_joint(out.flatten(1), derived.cu_txt, derived.cu_img, txt.shape[0])
        return self.to_out[0](img_out), self.to_add_out(txt_out)


class DualStreamBlock(nn.Module):
    """One MMDiT block: adaLN-modulated joint attention then MLP, each stream with its own weights."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.attn = JointAttention(dim, heads, head_dim, eps)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.img_mlp = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")
        self.txt_mlp = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

    def forward(self, img: Tensor, txt: Tensor, img_temb: Tensor, txt_temb: Tensor, derived: "_Derived", backend: str):
        img_mod1, img_mod2 = self.img_mod(img_temb).chunk(2, dim=-1)
        txt_mod1, txt_mod2 = self.txt_mod(txt_temb).chunk(2, dim=-1)

        img_in, img_gate = modulate(self.img_norm1(img), img_mod1, derived.img_segment)
        txt_in, txt_gate = modulate(self.txt_norm1(txt), txt_mod1, derived.txt_segment)
        img_attn, txt_attn = self.attn(img_in, txt_in, derived, backend)
        img = img + img_gate * img_attn
        txt = txt + txt_gate * txt_attn

        img_in, img_gate = modulate(self.img_norm2(img), img_mod2, derived.img_segment)
        txt_in, txt_gate = modulate(self.txt_norm2(txt), txt_mod2, derived.txt_segment)
        img = img + img_gate * self.img_mlp(img_in)
        txt = txt + txt_gate * self.txt_mlp(txt_in)
        if img.dtype == torch.float16:  # as the reference model: keep fp16 residuals finite
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
        return img, txt


class TimestepProjection(nn.Module):
    """Sinusoidal features of t * 1000 (t in [0, 1]) -> MLP, as Qwen-Image."""

    def __init__(self, dim: int):
        super().__init__()
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=dim)

    def forward(self, timestep: Tensor, dtype: torch.dtype) -> Tensor:
        return self.timestep_embedder(self.time_proj(timestep).to(dtype))


class AdaNormOut(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)

    def forward(self, x: Tensor, temb: Tensor, segment: Tensor) -> Tensor:
        scale, shift = self.linear(self.silu(temb).to(x.dtype)).index_select(0, segment).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class _Derived:
    """What the blocks need to know about a batch (segments, offsets, RoPE tables), derived once from its
    `SequenceLayout` and prompt lengths."""

    def __init__(self, layout: SequenceLayout, text_lengths: Sequence[int], zero_cond_t: bool, rope, scheme: str):
        device = layout.device
        b = layout.batch_size
        self.cu_img = layout.cu_seqlens
        self.cu_txt = cu_seqlens_from_lengths(text_lengths, device)
        self.max_joint = max(t + s for t, s in zip(text_lengths, layout.seqlens))
        targets, refs = layout.target_lengths, layout.reference_lengths
        if zero_cond_t:
            # segment 2i: sample i's target (its timestep), 2i+1: its references (timestep 0)
            seg = [v for i, (t, r) in enumerate(zip(targets, refs)) for v in ((2 * i, t), (2 * i + 1, r))]
        else:
            seg = [(i, n) for i, n in enumerate(layout.seqlens)]
        ids, counts = zip(*seg)
        self.img_segment = torch.repeat_interleave(
            torch.tensor(ids, device=device), torch.tensor(counts, device=device), output_size=sum(counts)
        )
        self.txt_segment = torch.repeat_interleave(
            torch.arange(b, device=device),
            torch.tensor(list(text_lengths), device=device),
            output_size=sum(text_lengths),
        )
        self.out_segment = torch.repeat_interleave(
            torch.arange(b, device=device), torch.tensor(targets, device=device), output_size=sum(targets)
        )
        img_pos, txt_pos = rope_positions(layout, text_lengths, scheme)
        self.img_rope, self.txt_rope = rope(img_pos), rope(txt_pos)
        # per sample: [target ; references], to keep the target rows only at the end
        self.cu_target, self.cu_refs = layout.cu_targets, layout.cu_references
        self.target_total = sum(targets)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class UniRefTransformer2DModel(ModelMixin, ConfigMixin):
    """Dual-stream MMDiT (Qwen-Image geometry by default) over packed multi-reference sequences.

    Args:
        patch_size: latent pixels per token side (2).
        in_channels: features of an image token, latent channels x patch_size^2 (64 = 16 x 4).
        out_channels: latent channels predicted per pixel (16); the output token has
            ``out_channels * patch_size^2`` features.
        num_layers, num_attention_heads, attention_head_dim: depth and attention geometry
            (Qwen-Image: 60, 24, 128).
        joint_attention_dim: features of a text token from the text encoder (3584 for Qwen2.5-VL).
        axes_dims_rope: channels of each head rotated by the (frame, row, col) axes; sums to the head dim.
        zero_cond_t: modulate reference tokens with timestep 0 (Qwen-Image-Edit-2511).
        rope_scheme: ``"msrope"`` (default) or ``"corner"``, see `rope_positions`.
        attention_backend: passed to `uniref.varlen_attention` (``"auto"`` picks the fastest).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 64,
        out_channels: int = 16,
        num_layers: int = 60,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 3584,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        zero_cond_t: bool = False,
        rope_scheme: str = "msrope",
        attention_backend: str = "auto",
    ):
        super().__init__()
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {tuple(axes_dims_rope)} must sum to attention_head_dim={attention_head_dim}"
            )
        if rope_scheme not in ROPE_SCHEMES:
            raise ValueError(f"rope_scheme must be one of {ROPE_SCHEMES}, got {rope_scheme!r}")
        dim = num_attention_heads * attention_head_dim
        self.inner_dim = dim
        self.rope = RotaryEmbedding3D(axes_dims_rope)
        self.time_text_embed = TimestepProjection(dim)
        self.txt_norm = RMSNorm(joint_attention_dim, eps=1e-6)
        self.img_in = nn.Linear(in_channels, dim)
        self.txt_in = nn.Linear(joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            DualStreamBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)
        )
        self.norm_out = AdaNormOut(dim)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.gradient_checkpointing = False
        # with gradient checkpointing on: recompute blocks 0, k, 2k, ... only (memory for compute)
        self.checkpoint_every_k_blocks = 1

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        timestep: Tensor,
        layout: SequenceLayout,
        text_lengths: Sequence[int] | None = None,
    ) -> Tensor:
        """Predicts the velocity of every sample's target tokens.

        Args:
            hidden_states: ``(T_img, in_channels)`` the image stream: every sample's [noisy target ; refs...]
                tokens, packed as ``layout`` describes (`uniref.pack_latents`).
            encoder_hidden_states: ``(T_txt, joint_attention_dim)`` every sample's prompt embedding,
                packed in sample order without padding.
            timestep: ``(B,)`` flow-matching time in [0, 1] of each sample.
            layout: the batch's `uniref.SequenceLayout` (offsets, positions, image sizes).
            text_lengths: tokens of each sample's prompt (host ints), summing to ``T_txt``.

        Returns:
            ``(T_target, out_channels * p * p)``: the target tokens of every sample, packed in order, laid
            out as ``layout.targets()``.

        The positional call before the layout had its own object, ``forward(packed, encoder_hidden_states,
        text_lengths, timestep[, hidden_states])``, still works (deprecated; removed in the next release).
        """
        if isinstance(hidden_states, PackedLatents):
            warnings.warn(
                "forward(packed, encoder_hidden_states, text_lengths, timestep, hidden_states) is "
                "deprecated; call forward(hidden_states, encoder_hidden_states, timestep, layout, "
                "text_lengths)",
                DeprecationWarning,
                stacklevel=2,
            )
            packed, lengths, t = hidden_states, timestep, layout
            tokens = packed.tokens if text_lengths is None else text_lengths
            hidden_states, timestep, layout, text_lengths = tokens, t, packed.layout, lengths
        if text_lengths is None:
            raise ValueError("text_lengths is required: the prompt tokens of each sample, summing to T_txt")
        text_lengths = [int(n) for n in text_lengths]
        if not isinstance(layout, SequenceLayout):
            raise ValueError(f"layout must be a uniref.SequenceLayout (from pack_latents), got {type(layout).__name__}")
        if len(text_lengths) != layout.batch_size or sum(text_lengths) != encoder_hidden_states.shape[0]:
            raise ValueError(
                f"text_lengths {text_lengths} must give one length per sample ({layout.batch_size}) summing to "
                f"encoder_hidden_states.shape[0]={encoder_hidden_states.shape[0]}"
            )
        if timestep.shape != (layout.batch_size,):
            raise ValueError(f"timestep must have shape ({layout.batch_size},), got {tuple(timestep.shape)}")
        if hidden_states.shape != (layout.total_tokens, self.config.in_channels):
            raise ValueError(
                f"hidden_states must be ({layout.total_tokens}, {self.config.in_channels}) as the layout "
                f"describes, got {tuple(hidden_states.shape)}"
            )
        derived = self._derived(layout, text_lengths)

        img = self.img_in(hidden_states)
        txt = self.txt_in(self.txt_norm(encoder_hidden_states))
        timestep = timestep.to(img.dtype)
        txt_temb = self.time_text_embed(timestep, img.dtype)
        if self.config.zero_cond_t:
            # rows 2i / 2i+1: sample i's target / references (timestep 0)
            img_temb = self.time_text_embed(torch.stack([timestep, torch.zeros_like(timestep)], 1).flatten(), img.dtype)
        else:
            img_temb = txt_temb
        backend = self.config.attention_backend
        for i, block in enumerate(self.transformer_blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing and i % self.checkpoint_every_k_blocks == 0:
                img, txt = self._gradient_checkpointing_func(block, img, txt, img_temb, txt_temb, derived, backend)
            else:
                img, txt = block(img, txt, img_temb, txt_temb, derived, backend)

        target, _ = split_joint(img, derived.cu_target, derived.cu_refs, derived.target_total)
        return self.proj_out(self.norm_out(target, txt_temb, derived.out_segment))

    def _derived(self, layout: SequenceLayout, text_lengths: list[int]) -> "_Derived":
        """What the blocks derive from ``layout``, reused while the same layout comes back with the same
        prompts -- every step of a sampling loop -- instead of rebuilt per forward."""
        cached = getattr(self, "_derived_cache", None)
        if cached is not None and cached[0]() is layout and cached[1] == text_lengths:
            return cached[2]
        derived = _Derived(layout, text_lengths, self.config.zero_cond_t, self.rope, self.config.rope_scheme)
        # A weak reference: the cache must not keep a finished batch's tensors alive.
        self._derived_cache = (weakref.ref(layout), list(text_lengths), derived)
        return derived

    @classmethod
    def from_qwenimage(
        cls,
        model_or_path,
        torch_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **overrides,
    ) -> "UniRefTransformer2DModel":
        """Converts a diffusers `QwenImageTransformer2DModel` exactly: a loaded object or a local folder.

        Our model is built with empty (meta) parameters, then filled:

        * from a folder (``config.json`` + safetensors, one file or diffusers' shards with their index):
          every tensor's name and shape checked against the shards' headers before anything is read, then
          shard by shard, each tensor converted to ``torch_dtype`` (default: as stored) and moved to
          ``device`` (default: the CPU) as it is assigned -- no second model, no fp32 copy;
        * from a loaded model: our parameters ARE its tensors (no copy), converted only if ``torch_dtype`` or
          ``device`` ask for it.

        ``overrides`` set config fields of ours (``rope_scheme``, ``attention_backend``). Nothing is downloaded.

        Raises:
            WeightsError (a ValueError): a folder whose config or weights do not describe a supported
                Qwen-Image transformer, naming the file and the tensor.
        """
        from accelerate import init_empty_weights
        from diffusers import QwenImageTransformer2DModel

        from uniref.models.loading import WeightsError, load_into_meta_model

        if isinstance(model_or_path, QwenImageTransformer2DModel):
            with init_empty_weights():
                model = cls(**_config_from_qwenimage(dict(model_or_path.config), "the source model"), **overrides)
            model.load_state_dict(model_or_path.state_dict(), strict=True, assign=True)
            if torch_dtype is not None or device is not None:
                model = model.to(device=device, dtype=torch_dtype)
            return model.eval()
        folder = Path(model_or_path)
        config_file = folder / "config.json"
        try:
            config = json.loads(config_file.read_text())
        except FileNotFoundError:
            raise WeightsError(f"{folder} has no config.json: not a saved QwenImageTransformer2DModel folder") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise WeightsError(f"{config_file} is not valid JSON ({exc})") from exc
        name = config.get("_class_name")
        if name not in (None, "QwenImageTransformer2DModel"):
            raise WeightsError(f"{config_file}: _class_name is {name!r}, not QwenImageTransformer2DModel")
        with init_empty_weights():
            model = cls(**_config_from_qwenimage(config, str(config_file)), **overrides)
        return load_into_meta_model(model, folder, torch_dtype, device or "cpu")

    def to_qwenimage(self):
        """This model as a diffusers `QwenImageTransformer2DModel` sharing its tensors (no copy): save it
        with ``save_pretrained`` and diffusers' ``QwenImageEditPlusPipeline`` (and everything built on
        diffusers) loads it unchanged.

        Raises:
            ValueError: a config diffusers' model cannot express (``rope_scheme="corner"``).
        """
        from accelerate import init_empty_weights
        from diffusers import QwenImageTransformer2DModel

        cfg = self.config
        if cfg.rope_scheme != "msrope":
            raise ValueError(f"rope_scheme={cfg.rope_scheme!r}: diffusers' QwenImageTransformer2DModel has msrope only")
        with init_empty_weights():
            out = QwenImageTransformer2DModel(
                patch_size=cfg.patch_size,
                in_channels=cfg.in_channels,
                out_channels=cfg.out_channels,
                num_layers=cfg.num_layers,
                attention_head_dim=cfg.attention_head_dim,
                num_attention_heads=cfg.num_attention_heads,
                joint_attention_dim=cfg.joint_attention_dim,
                axes_dims_rope=tuple(cfg.axes_dims_rope),
                zero_cond_t=cfg.zero_cond_t,
            )
        out.load_state_dict(self.state_dict(), strict=True, assign=True)
        return out.eval()

    def load_lora(self, path, merge: bool = False, adapter_name: str = "default") -> "UniRefTransformer2DModel":
        """Adds a LoRA file (diffusers, PEFT or kohya/ComfyUI format, detected from its keys; see `uniref.lora`)
        as a PEFT adapter, or merges it into the weights (``merge=True``: the model keeps its architecture).

        Raises:
            uniref.lora.LoraError: a file of no known format, a module this model lacks, or shapes that do not fit.
        """
        from uniref.lora import inject_lora, merge_adapters, read_lora

        weights, _ = read_lora(path)
        inject_lora(self, weights, adapter_name)
        return merge_adapters(self) if merge else self

    def save_pretrained(self, save_directory, *args, format: str = "uniref", **kwargs):
        """diffusers' ``save_pretrained``; ``format="diffusers"`` writes a `QwenImageTransformer2DModel` folder
        instead (`to_qwenimage`), for diffusers, ComfyUI and the tools built on them."""
        if format == "diffusers":
            return self.to_qwenimage().save_pretrained(save_directory, *args, **kwargs)
        if format != "uniref":
            raise ValueError(f"format must be 'uniref' or 'diffusers', got {format!r}")
        return super().save_pretrained(save_directory, *args, **kwargs)


def _config_from_qwenimage(cfg: dict, where: str) -> dict:
    """Our config fields for a diffusers `QwenImageTransformer2DModel` config; its options this model does not
    implement are refused, naming where the config came from."""
    from uniref.models.loading import WeightsError

    unsupported = [k for k in ("guidance_embeds", "use_additional_t_cond", "use_layer3d_rope") if cfg.get(k)]
    if unsupported:
        raise WeightsError(f"from_qwenimage: {where} uses {unsupported}, which this model does not support")
    try:
        return dict(
            patch_size=cfg.get("patch_size", 2),
            in_channels=cfg.get("in_channels", 64),
            out_channels=cfg.get("out_channels") or cfg.get("in_channels", 64),
            num_layers=cfg.get("num_layers", 60),
            attention_head_dim=cfg.get("attention_head_dim", 128),
            num_attention_heads=cfg.get("num_attention_heads", 24),
            joint_attention_dim=cfg.get("joint_attention_dim", 3584),
            axes_dims_rope=tuple(cfg.get("axes_dims_rope", (16, 56, 56))),
            zero_cond_t=bool(cfg.get("zero_cond_t", False)),
        )
    except TypeError as exc:
        raise WeightsError(f"{where}: a config field has the wrong type ({exc})") from exc
