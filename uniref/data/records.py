"""One record type for every dataset: an edit's prompt, its references in order, its target when it has one.

Images are kept as where they come from (a file path, or an in-memory image) and decoded only when read,
through the same reader `uniref edit` uses: EXIF orientation applied, converted to 8-bit RGB, transparency
composited on white, decompression bombs and truncated files refused with the file named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torch import Tensor

__all__ = ["DatasetError", "EditRecord", "ImageSource", "decode_image"]

ImageSource = Path | PIL.Image.Image


class DatasetError(ValueError):
    """A dataset, row or file that cannot be read; the message names the row (id or line) and the file."""


def decode_image(source: ImageSource, where: str = "") -> PIL.Image.Image:
    """An RGB PIL image from a file path or an in-memory image (see the module docstring).

    Raises:
        DatasetError: the file is missing, empty, not an image, truncated, too large, or of an unsupported mode;
            ``where`` (e.g. ``"row 3 (id a17)"``) starts the message.
    """
    from uniref.cli.edit import EditInputError, load_image

    prefix = f"{where}: " if where else ""
    if isinstance(source, PIL.Image.Image):
        image = PIL.ImageOps.exif_transpose(source)
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(white, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    try:
        return load_image(source)
    except EditInputError as exc:
        message = str(exc).removeprefix(f"--image {source}: ")
        raise DatasetError(f"{prefix}{source}: {message}") from None


def _as_uint8(image: PIL.Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


@dataclass
class EditRecord:
    """One training or evaluation example.

    Attributes:
        id: the row's id (a metadata id, a file stem, or the row number as a string), unique in its dataset.
        prompt: the instruction.
        references: the reference images in the order the prompt refers to them (zero or more).
        target: the edited image, ``None`` in prompt-only datasets (RL rollouts, benchmarks).
        metadata: whatever else the row holds (e.g. a crop for a reward), passed through untouched.
    """

    id: str
    prompt: str
    references: list[ImageSource] = field(default_factory=list)
    target: ImageSource | None = None
    metadata: dict = field(default_factory=dict)

    def reference_images(self) -> list[PIL.Image.Image]:
        """The references decoded as RGB PIL images (see `decode_image`)."""
        return [decode_image(r, f"id {self.id}, reference {k}") for k, r in enumerate(self.references)]

    def target_image(self) -> PIL.Image.Image | None:
        return None if self.target is None else decode_image(self.target, f"id {self.id}, target")

    def tensors(self) -> tuple[Tensor | None, list[Tensor]]:
        """``(target, references)`` as uint8 ``(3, H, W)`` tensors, as training consumes them."""
        target = self.target_image()
        return (None if target is None else _as_uint8(target)), [_as_uint8(r) for r in self.reference_images()]
