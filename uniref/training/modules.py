"""What training builds: the pipeline from a config, and the trainable module DeepSpeed wraps."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from uniref.packing import SequenceLayout, cu_seqlens_from_lengths

__all__ = ["EditModel", "PromptBatch", "adapters_disabled", "build_pipeline", "compute_dtype", "merged_pipeline"]

_STORAGE_ONLY = (torch.float8_e4m3fn, torch.float8_e5m2)  # weights stored in 8 bits, computed in another dtype


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``module`` computes in: its parameters' dtype, 8-bit storage (a float8 base) aside."""
    return next(p.dtype for p in module.parameters() if p.dtype not in _STORAGE_ONLY)


@dataclass(frozen=True)
class PromptBatch:
    """The prompts of a packed batch, encoded once (`EditModel.encode`) and reused by every forward on it:
    every denoising step of a rollout and every trained timestep of its update.

    Attributes:
        texts: one prompt per sample (with guidance: the conditional prompts, then the negative ones).
        images: per sample, its reference PIL images (only vision-language encoders look at them).
        embeds: ``(T_txt, D)`` the packed embeddings, computed without gradients; ``None``: not encoded yet
            (the forward encodes).
        lengths: tokens per sample (host ints), summing to ``T_txt``.
    """

    texts: list[str]
    images: list[list]
    embeds: Tensor | None = None
    lengths: list[int] | None = None

    def select(self, rows: list[int]) -> "PromptBatch":
        """The prompts of samples ``rows`` alone, in that order (their embeddings sliced, not re-encoded)."""
        embeds = None
        if self.embeds is not None:
            cu = cu_seqlens_from_lengths(self.lengths).tolist()
            embeds = torch.cat([self.embeds[cu[r] : cu[r + 1]] for r in rows])
        return PromptBatch(
            [self.texts[r] for r in rows],
            [self.images[r] for r in rows],
            embeds,
            None if self.lengths is None else [self.lengths[r] for r in rows],
        )

    def without_embeds(self) -> "PromptBatch":
        return dataclasses.replace(self, embeds=None, lengths=None)


def build_pipeline(model_cfg, seed: int):
    """The `UniRefEditPipeline` a run starts from (see `ModelConfig`, whose checks have vetted its folders),
    on the CPU in float32."""
    from uniref.pipelines.edit import UniRefEditPipeline

    if model_cfg.preset is not None:
        from uniref.presets import random_edit_pipeline

        pipe = random_edit_pipeline(
            model_cfg.preset,
            seed=seed,
            attention_backend=model_cfg.attention_backend,
            transformer_overrides=model_cfg.overrides,
        )
        if model_cfg.vae is not None:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(model_cfg.vae, use_safetensors=True)
            pipe = UniRefEditPipeline(  # re-checks that the trained VAE's latents fit the transformer
                transformer=pipe.transformer,
                vae=vae,
                scheduler=pipe.scheduler,
                text_encoder=pipe.text_encoder,
                target_pixels=pipe.config.target_pixels,
                pixel_budget=pipe.config.get("pixel_budget"),
            )
    elif model_cfg.pretrained is not None:
        path = None if model_cfg.pretrained == "default" else Path(model_cfg.pretrained)
        pipe = UniRefEditPipeline.from_pretrained(path)
        pipe.transformer.register_to_config(attention_backend=model_cfg.attention_backend)
    else:
        # the transformer straight from its shards (one copy of the weights, as stored), the rest through diffusers
        pipe = UniRefEditPipeline.from_qwenimage_edit_folder(
            model_cfg.qwen_image_edit, attention_backend=model_cfg.attention_backend
        )
    pipe.vae.requires_grad_(False).eval()
    pipe.transformer.train()
    if model_cfg.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
        pipe.transformer.checkpoint_every_k_blocks = model_cfg.checkpoint_every_k_blocks
    return pipe


class EditModel(nn.Module):
    """The trained part of the pipeline: its transformer (full or LoRA) and, optionally, its text encoder.

    ``forward`` predicts the velocity of every sample's target tokens for a packed batch, encoding the
    prompts on the way (with gradients when the text encoder trains).
    """

    def __init__(
        self,
        transformer: nn.Module,
        text_encoder: nn.Module,
        train_text_encoder: bool,
        lora=None,
        base_dtype: str = "auto",
    ):
        super().__init__()
        if lora is not None:
            from peft import LoraConfig, inject_adapter_in_model

            from uniref.lora import inject_lora, read_lora

            transformer.requires_grad_(False)
            if base_dtype == "float8_e4m3fn":  # before the adapters: they wrap the 8-bit layers
                from uniref.models.float8 import quantize_linears

                quantize_linears(transformer, compute_dtype=compute_dtype(transformer))
            if lora.init is not None:  # further training of a LoRA made here or elsewhere
                inject_lora(transformer, read_lora(lora.init)[0])
            else:
                config = LoraConfig(
                    r=lora.rank,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=list(lora.target_modules),
                )
                inject_adapter_in_model(config, transformer)
            if not any(p.requires_grad for p in transformer.parameters()):
                raise ValueError(
                    f"model.lora.target_modules {lora.target_modules} matched no module of the transformer"
                )
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.train_text_encoder = train_text_encoder
        text_encoder.requires_grad_(train_text_encoder)
        text_encoder.train(train_text_encoder)

    def encode_prompts(self, prompts: list[str], images) -> tuple[Tensor, list[int]]:
        """Packed prompt embeddings ``(T_txt, D)`` and lengths; with gradients only when the text encoder trains."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_text_encoder):
            embeds, lengths = self.text_encoder.encode_prompts(list(prompts), images)
        return embeds, [int(n) for n in lengths]

    @torch.no_grad()
    def encode(self, texts: list[str], images=None) -> PromptBatch:
        """Encodes a batch's prompts once, without gradients (``images``: per sample, its reference PIL images)."""
        images = [list(x) for x in images] if images is not None else [[] for _ in texts]
        embeds, lengths = self.encode_prompts(texts, images)
        return PromptBatch(list(texts), images, embeds, lengths)

    def forward(self, hidden_states: Tensor, timestep: Tensor, layout: SequenceLayout, prompts: PromptBatch) -> Tensor:
        """Velocity ``(T_target, C p p)`` of the targets of the packed batch ``hidden_states`` (laid out by
        ``layout``) at per-sample time ``timestep`` ``(B,)``.

        The prompts' stored embeddings are used as they are, except when the text encoder trains and
        gradients are on (then it encodes again, so its gradients flow) or when there are none yet.
        """
        if prompts.embeds is None or (self.train_text_encoder and torch.is_grad_enabled()):
            embeds, lengths = self.encode_prompts(prompts.texts, prompts.images)
        else:
            embeds, lengths = prompts.embeds, prompts.lengths
        dtype = compute_dtype(self.transformer)
        return self.transformer(hidden_states.to(dtype), embeds.to(dtype), timestep.to(dtype), layout, lengths)


@contextlib.contextmanager
def adapters_disabled(module: nn.Module):
    """Runs the base model under LoRA adapters (the frozen reference policy of the KL term)."""
    from uniref.lora import tuner_layers

    layers = list(tuner_layers(module).values())
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def merged_pipeline(pipe, model: EditModel, pixel_budget: int | None = None):
    """``pipe`` with the trained weights of ``model`` (LoRA merged into the base weights), in eval mode;
    ``pixel_budget``: the default reference budget recorded in it (the one it was trained with)."""
    import copy

    from uniref.lora import merge_adapters
    from uniref.models.float8 import dequantize_linears

    transformer = copy.deepcopy(model.transformer)
    dequantize_linears(transformer)  # an 8-bit base goes back to plain layers before the adapters merge into it
    transformer = merge_adapters(transformer.float().eval())
    transformer.requires_grad_(False)
    text_encoder = copy.deepcopy(model.text_encoder).float().eval().requires_grad_(False)
    from uniref.pipelines.edit import UniRefEditPipeline

    return UniRefEditPipeline(
        transformer=transformer,
        vae=pipe.vae,
        scheduler=pipe.scheduler,
        text_encoder=text_encoder,
        target_pixels=pipe.config.target_pixels,
        pixel_budget=pixel_budget or pipe.config.get("pixel_budget"),
    )
