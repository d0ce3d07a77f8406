"""Per-reference image-embedding similarity: the output (or a crop of it) against each reference.

The cheap, in-process complement of a VLM judge. DyRef (github.com/Weistrass/DyRef; see
docs/rewards.md) scores multi-reference outputs with SigLIP2 cosine similarity to each reference, squashed
by a margin ``sigmoid(k (s - tau))`` with ``tau = 0.65`` and ``k = 10 + 3 (n - 2)`` for ``n`` references,
so that the reward sharpens as the references multiply and each must be kept more exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from uniref.rewards.records import Record, check_images, to_pil

__all__ = ["SimilarityReward", "margin"]


def margin(s: torch.Tensor, n_refs: int, tau: float = 0.65, k: float = 10.0, k_per_ref: float = 3.0) -> torch.Tensor:
    """``sigmoid(k_n (s - tau))`` with ``k_n = k + k_per_ref * max(n_refs - 2, 0)`` (DyRef's margin; at
    one or two references ``k_n = k``)."""
    return torch.sigmoid((k + k_per_ref * max(n_refs - 2, 0)) * (s - tau))


class SimilarityReward:
    """Cosine similarity between image embeddings of the output and of each reference.

    Args:
        path: a local transformers folder: SigLIP / SigLIP2 / CLIP (``get_image_features``) or DINOv2
            (the pooled CLS token); loaded with ``AutoModel`` + ``AutoImageProcessor``, nothing downloaded.
        device, dtype: where and in what precision the model runs.
        batch_size: images per forward pass.
        use_margin: squash each similarity by `margin` (``tau``, ``k``, ``k_per_ref``).
        crop_key: the metadata key of a crop box ``(x0, y0, x1, y1)`` in output pixels, or of a list of
            boxes, one per reference; records without it are scored on the whole output.
        text: add ``text_alignment``, the cosine similarity between the whole output and the prompt, through
            the model's text tower (SigLIP / SigLIP2 / CLIP; the folder's tokenizer, padded to
            ``max_text_length`` as SigLIP was trained).

    Axes: ``similarity_mean`` and ``similarity_min`` over a record's references (then ``text_alignment``).
    """

    def __init__(
        self,
        path: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 32,
        use_margin: bool = False,
        tau: float = 0.65,
        k: float = 10.0,
        k_per_ref: float = 3.0,
        crop_key: str = "crop",
        text: bool = False,
        max_text_length: int = 64,
    ):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = AutoModel.from_pretrained(path, dtype=dtype, local_files_only=True).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        self.use_margin, self.tau, self.k, self.k_per_ref, self.crop_key = use_margin, tau, k, k_per_ref, crop_key
        self.judge_id = str(path)
        self.names = ("similarity_mean", "similarity_min") + (("text_alignment",) if text else ())
        self.tokenizer, self.max_text_length = None, max_text_length
        if text:
            if not hasattr(self.model, "get_text_features"):
                raise ValueError(f"text=True needs a model with a text tower (SigLIP, CLIP); {path} has none")
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)

    @torch.inference_mode()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings, float32 ``(len(texts), D)`` (needs ``text=True``)."""
        if self.tokenizer is None:
            raise ValueError("embed_text needs the source built with text=True")
        out = []
        for i in range(0, len(texts), self.batch_size):
            ids = self.tokenizer(
                texts[i : i + self.batch_size],
                padding="max_length",
                truncation=True,
                max_length=self.max_text_length,
                return_tensors="pt",
            )["input_ids"]
            f = self.model.get_text_features(input_ids=ids.to(self.device))
            f = f if isinstance(f, torch.Tensor) else f.pooler_output
            out.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """Unit-norm embeddings, float32 ``(len(images), D)``."""
        out = []
        for i in range(0, len(images), self.batch_size):
            px = self.processor(images=images[i : i + self.batch_size], return_tensors="pt")["pixel_values"]
            px = px.to(self.device, self.dtype)
            if hasattr(self.model, "get_image_features"):
                f = self.model.get_image_features(pixel_values=px)
                f = f if isinstance(f, torch.Tensor) else f.pooler_output
            else:
                f = self.model(pixel_values=px).pooler_output
            out.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu())
        return torch.cat(out)

    def _crops(self, record: Record, output: Image.Image, index: int) -> list[Image.Image]:
        box = record.metadata.get(self.crop_key)
        n = len(record.references)
        if box is None:
            return [output] * n
        boxes = box if box and isinstance(box[0], (list, tuple)) else [box] * n
        if len(boxes) != n:
            raise ValueError(f"records[{index}].metadata[{self.crop_key!r}] has {len(boxes)} boxes for {n} references")
        crops = []
        for b in boxes:
            x0, y0, x1, y1 = (int(v) for v in b)
            if not (0 <= x0 < x1 <= output.width and 0 <= y0 < y1 <= output.height):
                raise ValueError(
                    f"records[{index}].metadata[{self.crop_key!r}] box {tuple(b)} is not inside the "
                    f"{output.width}x{output.height} output; give (x0, y0, x1, y1) in output pixels"
                )
            crops.append(output.crop((x0, y0, x1, y1)))
        return crops

    def __call__(self, records: Sequence, images: torch.Tensor) -> torch.Tensor:
        """``(N, 2)`` float32 (``(N, 3)`` with ``text``): mean and min over each record's references of the
        (margined) similarity, then the output-prompt similarity.

        Args:
            records: N records with at least one reference each.
            images: float ``(N, 3, H, W)`` in [0, 1].
        """
        recs = check_images(records, images)
        outs, refs, counts, whole = [], [], [], []
        for i, (r, img) in enumerate(zip(recs, images)):
            if not r.references:
                raise ValueError(f"records[{i}] has no references to compare with")
            whole.append(to_pil(img, f"images[{i}]"))
            outs += self._crops(r, whole[-1], i)
            refs += r.references
            counts.append(len(r.references))
        sims = (self.embed(outs) * self.embed(refs)).sum(-1)
        rows = []
        for s in sims.split(counts):
            if self.use_margin:
                s = margin(s, len(s), self.tau, self.k, self.k_per_ref)
            rows.append([s.mean().item(), s.min().item()])
        result = torch.tensor(rows, dtype=torch.float32)
        if self.tokenizer is not None:
            align = (self.embed(whole) * self.embed_text([r.prompt for r in recs])).sum(-1, keepdim=True)
            result = torch.cat([result, align], dim=1)
        return result
