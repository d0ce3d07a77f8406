"""Prompt encoders of the edit pipeline: the interface, a small self-contained byte-level encoder and the
Qwen2.5-VL path of Qwen-Image-Edit-Plus.

A prompt encoder turns each sample's instruction (and, for vision-language encoders, its reference images)
into a variable number of feature vectors. Like everything the transformer reads, the result is *packed*:
``(T_txt, D)`` for the whole batch plus the token count of each sample -- no padding anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import PIL.Image
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import logging
from torch import Tensor, nn

logger = logging.get_logger(__name__)

__all__ = ["ByteTextEncoder", "PromptEncoder", "QwenVLPromptEncoder"]


@runtime_checkable
class PromptEncoder(Protocol):
    """What `UniRefEditPipeline` needs from its ``text_encoder`` component.

    Implementations are `torch.nn.Module`s (so the pipeline can move them with ``pipe.to(...)``) and, to
    be saved with the pipeline, diffusers ``ModelMixin``s.
    """

    @property
    def embed_dim(self) -> int:
        """Features of one output token; must equal the transformer's ``joint_attention_dim``."""

    def encode_prompts(
        self, prompts: Sequence[str], images: Sequence[Sequence[PIL.Image.Image]]
    ) -> tuple[Tensor, list[int]]:
        """Encodes one prompt per sample.

        Args:
            prompts: ``B`` instructions.
            images: ``B`` lists of RGB reference images, ``images[i]`` for ``prompts[i]``, in the order the
                prompt refers to them ("picture 1", ...). Text-only encoders ignore them.

        Returns:
            ``(embeds, lengths)``: ``embeds`` ``(sum(lengths), embed_dim)`` on the encoder's device, sample i's
            tokens at rows ``sum(lengths[:i]) : sum(lengths[:i + 1])``; ``lengths`` host ints, each >= 1.
        """


# --------------------------------------------------------------------------------------------
# ByteTextEncoder: no vocabulary files, nothing to download, trainable
# --------------------------------------------------------------------------------------------


class _EncoderLayer(nn.Module):
    """Pre-norm transformer layer over a packed batch: self-attention within each prompt, then MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int, backend: str) -> Tensor:
        from uniref import varlen_attention

        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).unbind(1)
        attn = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, backend=backend)
        x = x + self.proj(attn.flatten(1))
        return x + self.mlp(self.norm2(x))


class ByteTextEncoder(ModelMixin, ConfigMixin):
    """A small transformer encoder over the UTF-8 bytes of a prompt.

    The tokenizer is the identity on bytes (ids 0-255) plus a leading BOS token (id 256), so there is no
    vocabulary file and any language or emoji encodes; an empty prompt still yields one token. Prompts
    are processed packed (`uniref.varlen_attention` over ``cu_seqlens``), so a prompt's features do not
    depend on the other prompts of the batch. Reference images are ignored: this encoder reads text only.

    Args:
        embed_dim: features of an output token (the transformer's ``joint_attention_dim``).
        hidden_dim: width of the encoder layers.
        num_layers: number of encoder layers.
        num_heads: attention heads; ``hidden_dim`` must be divisible by it.
        max_length: tokens kept per prompt, BOS included (longer prompts are truncated with a warning);
            also the size of the learned position table.
        mlp_ratio: MLP expansion of each layer.
        attention_backend: passed to `uniref.varlen_attention`.
    """

    BOS = 256
    VOCAB_SIZE = 257

    @register_to_config
    def __init__(
        self,
        embed_dim: int = 256,
        hidden_dim: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        max_length: int = 512,
        mlp_ratio: int = 4,
        attention_backend: str = "auto",
    ):
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim={hidden_dim} must be divisible by num_heads={num_heads}")
        if max_length < 1:
            raise ValueError(f"max_length={max_length} must be >= 1 (the BOS token)")
        self.token_embedding = nn.Embedding(self.VOCAB_SIZE, hidden_dim)
        self.position_embedding = nn.Embedding(max_length, hidden_dim)
        self.layers = nn.ModuleList(_EncoderLayer(hidden_dim, num_heads, mlp_ratio) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(hidden_dim)
        self.proj_out = nn.Linear(hidden_dim, embed_dim)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, list[int]]:
        """UTF-8 bytes with a leading BOS: ``(ids (T,) int64 on the model's device, lengths)``."""
        max_length = self.config.max_length
        ids, lengths = [], []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompts[{i}] must be a str, got {type(prompt).__name__}")
            data = prompt.encode("utf-8")
            if len(data) + 1 > max_length:
                logger.warning(
                    f"prompt {i} is {len(data)} bytes; ByteTextEncoder keeps the first {max_length - 1} "
                    f"(max_length={max_length}, BOS included)"
                )
                data = data[: max_length - 1]
            ids.append(self.BOS)
            ids.extend(data)
            lengths.append(len(data) + 1)
        return torch.tensor(ids, dtype=torch.long, device=self.device), lengths

    def forward(self, input_ids: Tensor, lengths: Sequence[int]) -> Tensor:
        """Encodes a packed batch of token ids.

        Args:
            input_ids: ``(T,)`` int64 ids (`tokenize`), every prompt's tokens in sample order.
            lengths: tokens per prompt (host ints, each in ``[1, max_length]``), summing to T.

        Returns:
            ``(T, embed_dim)`` features, packed like ``input_ids``.
        """
        lengths = [int(n) for n in lengths]
        if sum(lengths) != input_ids.shape[0] or min(lengths, default=0) < 1 or max(lengths) > self.config.max_length:
            raise ValueError(
                f"lengths {lengths} must be in [1, {self.config.max_length}] and sum to the "
                f"{input_ids.shape[0]} tokens of input_ids"
            )
        device = input_ids.device
        counts = torch.tensor(lengths, device=device)
        starts = torch.cumsum(counts, 0) - counts
        positions = torch.arange(input_ids.shape[0], device=device) - torch.repeat_interleave(
            starts, counts, output_size=input_ids.shape[0]
        )
        cu_seqlens = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)
        for layer in self.layers:
            x = layer(x, cu_seqlens, max(lengths), self.config.attention_backend)
        return self.proj_out(self.norm_out(x))

    def encode_prompts(
        self, prompts: Sequence[str], images: Sequence[Sequence[PIL.Image.Image]] | None = None
    ) -> tuple[Tensor, list[int]]:
        """`PromptEncoder.encode_prompts`: the images are ignored (text-only encoder)."""
        ids, lengths = self.tokenize(prompts)
        return self(ids, lengths), lengths


# --------------------------------------------------------------------------------------------
# Qwen2.5-VL, as Qwen-Image-Edit-Plus encodes its prompts
# --------------------------------------------------------------------------------------------


class QwenVLPromptEncoder(ModelMixin):
    """Qwen2.5-VL prompt encoding exactly as diffusers' `QwenImageEditPlusPipeline` does it.

    The encoding is diffusers' own code: a text-only `QwenImageEditPlusPipeline` (no transformer, no VAE)
    holds the Qwen2.5-VL model and its processor, and `encode_prompts` calls its ``encode_prompt`` once
    per sample with that sample's references resized as that pipeline resizes them for the VL model
    (``CONDITION_IMAGE_SIZE``, about 384^2, aspect kept). The system template, the dropped template tokens
    and the last-hidden-state features are therefore those of the peer; only the padding is removed.

    Args:
        text_encoder: a loaded ``transformers.Qwen2_5_VLForConditionalGeneration``.
        processor: its ``Qwen2VLProcessor`` (tokenizer + image processor).

    Saved by the pipeline's ``save_pretrained`` as ``text_encoder/model`` and ``text_encoder/processor``
    (transformers' own formats); loading needs the ``transformers`` package and reads local files only.
    """

    _model_folder = "model"
    _processor_folder = "processor"

    def __init__(self, text_encoder, processor):
        super().__init__()
        from diffusers import QwenImageEditPlusPipeline

        self.text_encoder = text_encoder  # registered as a submodule, so pipe.to(device) moves it
        # diffusers' encoding code runs on this text-only pipeline; it shares the model object above.
        self._qwen = QwenImageEditPlusPipeline(
            scheduler=None,
            vae=None,
            text_encoder=text_encoder,
            tokenizer=processor.tokenizer,
            processor=processor,
            transformer=None,
        )

    @classmethod
    def from_pipeline(cls, pipe) -> "QwenVLPromptEncoder":
        """Wraps the text encoder and processor of a loaded `QwenImageEditPlusPipeline` (shared, not copied)."""
        return cls(pipe.text_encoder, pipe.processor)

    @property
    def processor(self):
        return self._qwen.processor

    @property
    def embed_dim(self) -> int:
        cfg = self.text_encoder.config
        return int(getattr(cfg, "text_config", cfg).hidden_size)

    def encode_prompts(
        self, prompts: Sequence[str], images: Sequence[Sequence[PIL.Image.Image]]
    ) -> tuple[Tensor, list[int]]:
        """`PromptEncoder.encode_prompts` through diffusers' ``QwenImageEditPlusPipeline.encode_prompt``."""
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as qwen_edit

        if len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} image lists; pass one list per prompt")
        chunks = []
        # One call per sample: the template names each of the sample's pictures, and samples differ in
        # how many they have.
        for prompt, refs in zip(prompts, images):
            condition = []
            for img in refs:
                w, h = qwen_edit.calculate_dimensions(qwen_edit.CONDITION_IMAGE_SIZE, img.width / img.height)
                condition.append(self._qwen.image_processor.resize(img, h, w))
            embeds, mask = self._qwen.encode_prompt(prompt=[prompt], image=condition, device=self.device)
            # a single prompt has no padding, so the mask (when diffusers returns one) is all ones
            chunks.append(embeds[0] if mask is None else embeds[0][mask[0].bool()])
        return torch.cat(chunks), [c.shape[0] for c in chunks]

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True, **kwargs):
        """Saves the Qwen2.5-VL model and its processor with transformers' own ``save_pretrained``."""
        self.text_encoder.save_pretrained(
            os.path.join(save_directory, self._model_folder), safe_serialization=safe_serialization
        )
        self.processor.save_pretrained(os.path.join(save_directory, self._processor_folder))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, torch_dtype=None, **kwargs):
        """Loads what `save_pretrained` wrote (local files only, safetensors only: a ``pytorch_model.bin`` is
        never unpickled). Other diffusers loading kwargs are ignored.

        Raises:
            OSError: the model folder has no ``.safetensors`` weights.
        """
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        root = str(pretrained_model_name_or_path)
        model_dir = os.path.join(root, cls._model_folder)
        if not any(name.endswith(".safetensors") for name in os.listdir(model_dir)):
            raise OSError(
                f"{model_dir} has no .safetensors weights (uniref loads safetensors only and never "
                "unpickles .bin files); re-save it with safe_serialization=True"
            )
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch_dtype, local_files_only=True, use_safetensors=True
        )
        processor = AutoProcessor.from_pretrained(os.path.join(root, cls._processor_folder), local_files_only=True)
        return cls(model.eval(), processor)
