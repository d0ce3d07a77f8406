"""What every reward source reads: records (prompt, references, metadata) and output images.

A record is any object with ``.prompt`` (str) and ``.references`` (a list of RGB PIL images or uint8
``(3, H, W)`` tensors); ``.metadata`` (a dict) is optional. The synthetic world's `Task` (``.prompt``,
``.images``) is accepted as is.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

__all__ = ["Record", "as_record", "check_images", "image_hash", "png_bytes", "to_pil"]


@dataclass
class Record:
    """One sample to score: its instruction, its references (RGB PIL) and free-form metadata
    (e.g. ``{"crop": (x0, y0, x1, y1)}`` in output pixels for `similarity`)."""

    prompt: str
    references: list[Image.Image]
    metadata: dict = field(default_factory=dict)


def to_pil(image, name: str) -> Image.Image:
    """An RGB PIL image from a PIL image, a uint8 ``(3, H, W)`` tensor or a float ``(3, H, W)`` tensor in
    [0, 1]; a clear error naming `name` otherwise."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"{name} as a tensor must be (3, H, W), got shape {tuple(t.shape)}")
        if t.is_floating_point():
            t = (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
        elif t.dtype != torch.uint8:
            raise ValueError(f"{name} as a tensor must be uint8 or float in [0, 1], got {t.dtype}")
        return Image.fromarray(t.permute(1, 2, 0).contiguous().numpy(), "RGB")
    raise TypeError(f"{name} must be a PIL image or a (3, H, W) tensor, got {type(image).__name__}")


def as_record(obj, index: int = 0) -> Record:
    """A `Record` from any object with ``.prompt`` and ``.references`` (or ``.images``, as the synthetic
    world's `Task` has); references become RGB PIL images."""
    if isinstance(obj, dict):
        prompt, refs, meta = obj.get("prompt"), obj.get("references", obj.get("images")), obj.get("metadata", {})
    else:
        prompt = getattr(obj, "prompt", None)
        refs = getattr(obj, "references", None)
        if refs is None:
            refs = getattr(obj, "images", None)
        meta = getattr(obj, "metadata", None) or {}
    if not isinstance(prompt, str):
        raise TypeError(f"records[{index}] needs a str .prompt, got {type(prompt).__name__}")
    if refs is None:
        raise TypeError(f"records[{index}] needs .references (or .images): a list of PIL images or (3, H, W) tensors")
    refs = [to_pil(r, f"records[{index}].references[{j}]") for j, r in enumerate(refs)]
    return Record(prompt=prompt, references=refs, metadata=dict(meta))


def check_images(records: Sequence, images: torch.Tensor) -> list[Record]:
    """Validates a scoring call and returns its records as `Record`s.

    Args:
        records: N records (see the module docstring).
        images: float ``(N, 3, H, W)`` in [0, 1].
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor (N, 3, H, W) in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}; divide uint8 by 255")
    if len(records) != images.shape[0]:
        raise ValueError(f"got {len(records)} records for {images.shape[0]} images; pass one record per image")
    return [as_record(r, i) for i, r in enumerate(records)]


def png_bytes(image: Image.Image) -> bytes:
    """The image as PNG bytes (lossless, so the judge sees exactly what was scored)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_hash(image: Image.Image) -> str:
    """A content hash of an RGB image: its size and raw pixels."""
    h = hashlib.sha256(f"{image.width}x{image.height}".encode())
    h.update(image.tobytes())
    return h.hexdigest()
