"""What training builds: the pipeline from a config, and the trainable module DeepSpeed wraps."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import Tensor, nn

from uniref.self import PackedLatents

__all__ = ["EditModel", "adapters_disabled", "build_pipeline", "merged_pipeline"]


def build_pipeline(model_cfg, seed: int):
    """The `UniRefEditPipeline` a run starts from (see `ModelConfig`, whose checks have vetted its folders),
    on the CPU in float32."""
    from uniref.pipelines.edit import UniRefEditPipeline

    if model_cfg.preset is not None:
        from uniref.testing import random_edit_pipeline

        pipe = random_edit_pipeline(model_cfg.preset, seed=seed, attention_backend=model_cfg.attention_backend,
                                    transformer_overrides=model_cfg.overrides)
        if model_cfg.vae is not None:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(model_cfg.vae, use_safetensors=True)
            pipe = UniRefEditPipeline(  # re-checks that the trained VAE's latents fit the transformer
                transformer=pipe.transformer, vae=vae, scheduler=pipe.scheduler,
                text_encoder=pipe.text_encoder, target_pixels=pipe.config.target_pixels,
                pixel_budget=pipe.config.get("pixel_budget"),
            )
    elif model_cfg.pretrained is not None:
        path = None if model_cfg.pretrained == "default" else Path(model_cfg.pretrained)
        pipe = UniRefEditPipeline.from_pretrained(path)
        pipe.transformer.register_to_config(attention_backend=model_cfg.attention_backend)
    else:
        from diffusers import QwenImageEditPlusPipeline

        base = QwenImageEditPlusPipeline.from_pretrained(model_cfg.qwen_image_edit, local_files_only=True)
        pipe = UniRefEditPipeline.from_qwenimage_edit(base, attention_backend=model_cfg.attention_backend)
    pipe.vae.requires_grad_(False).eval()
    pipe.transformer.train()
    if model_cfg.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    return pipe


class EditModel(nn.Module):
    """The trained part of the pipeline: its transformer (full or LoRA) and, optionally, its text encoder.

    ``forward`` predicts the velocity of every sample's target tokens for a packed batch, encoding the
    prompts on the way (with gradients when the text encoder trains).
    """

    def __init__(self, transformer: nn.Module, text_encoder: nn.Module, train_text_encoder: bool, lora=None):
        super().__init__()
        if lora is not None:
            from peft import LoraConfig, inject_adapter_in_model

            transformer.requires_grad_(False)
            config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                target_modules=list(lora.target_modules))
            inject_adapter_in_model(config, transformer)
            if not any(p.requires_grad for p in transformer.parameters()):
                raise ValueError(f"model.lora.target_modules {lora.target_modules} matched no module of the transformer")
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.train_text_encoder = train_text_encoder
        text_encoder.requires_grad_(train_text_encoder)
        text_encoder.train(train_text_encoder)

    def encode_prompts(self, prompts: list[str], images) -> tuple[Tensor, list[int]]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_text_encoder):
            embeds, lengths = self.text_encoder.encode_prompts(list(prompts), images)
        return embeds, [int(n) for n in lengths]

    def forward(self, packed: PackedLatents, prompts: list[str], timestep: Tensor, hidden_states: Tensor,
                images=None) -> Tensor:
        """Velocity ``(T_target, C p p)`` of the targets of ``packed`` (noisy tokens in ``hidden_states``).

        ``prompts``: one per sample; ``images``: per sample its reference PIL images (only VL encoders look).
        """
        embeds, lengths = self.encode_prompts(prompts, images or [[] for _ in prompts])
        dtype = next(self.transformer.parameters()).dtype
        return self.transformer(packed, embeds.to(dtype), lengths, timestep.to(dtype),
                                hidden_states=hidden_states.to(dtype))


def _tuner_layers(module: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(module: nn.Module):
    """Runs the base model under LoRA adapters (the frozen reference policy of the KL term)."""
    layers = _tuner_layers(module)
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

    transformer = copy.deepcopy(model.transformer).float().eval()
    layers = _tuner_layers(transformer) if any("lora_" in n for n, _ in transformer.named_parameters()) else []
    if layers:
        for m in layers:
            m.merge()
        # swap every tuner layer for its merged base layer, so the saved model has the plain architecture
        for m in list(transformer.modules()):
            for child_name, child in list(m.named_children()):
                if child in layers:
                    setattr(m, child_name, child.get_base_layer())
    transformer.requires_grad_(False)
    text_encoder = copy.deepcopy(model.text_encoder).float().eval().requires_grad_(False)
    from uniref.pipelines.edit import UniRefEditPipeline

    return UniRefEditPipeline(transformer=transformer, vae=pipe.vae, scheduler=pipe.scheduler,
                              text_encoder=text_encoder, target_pixels=pipe.config.target_pixels,
                              pixel_budget=pixel_budget or pipe.config.get("pixel_budget"))
