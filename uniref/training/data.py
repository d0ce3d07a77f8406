"""Training data: the synthetic world's stream, planned under a pixel budget and packed by a token budget.

A step's data is a pure function of (config, cursor): every rank renders the same global list of
micro-batches and keeps its own share, so 1 process with N micro-batches per step and N processes with
one each train on exactly the same samples, and a resumed run continues from the saved cursor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from uniref.packing import fit_area, plan_reference_sizes
from uniref.synthetic import EDIT_KINDS, SyntheticEditDataset

__all__ = ["MicroBatch", "TrainItem", "encode_micro_batch", "make_dataset", "plan_micro_batches", "sample_tokens"]


@dataclass
class TrainItem:
    """One sample: uint8 ``(3, H, W)`` target and references, the planned reference sizes, the prompt."""

    index: int
    prompt: str
    target: Tensor
    references: list[Tensor]
    planned: list[tuple[int, int]]
    tokens: int


@dataclass
class MicroBatch:
    """The samples of one packed forward (``position``: its index in the step's global list)."""

    position: int
    items: list[TrainItem]

    @property
    def tokens(self) -> int:
        return sum(it.tokens for it in self.items)


class RecordItems(torch.utils.data.Dataset):
    """The rows of a `uniref.data` dataset as training items (the synthetic stream's item dicts): uint8
    ``target`` and ``references``, ``reference_sizes``, ``prompt``. A row without a target, or one that cannot
    be read, raises `uniref.data.DatasetError` naming it."""

    def __init__(self, records, length: int | None = None):
        self.records, self.length = records, length

    def __len__(self) -> int:
        return min(len(self.records), self.length or len(self.records))

    def __getitem__(self, i: int) -> dict:
        from uniref.data import DatasetError

        record = self.records[i]
        if record.target is None:
            raise DatasetError(f"row {i} (id {record.id}): no target image, which supervised training needs")
        target, refs = record.tensors()
        return {
            "target": target,
            "references": refs,
            "reference_sizes": [tuple(r.shape[1:]) for r in refs],
            "prompt": record.prompt,
            "id": record.id,
        }


def make_dataset(data_cfg, seed: int):
    """The training stream of a config's ``data`` section: the synthetic world, endless or ``data.length``
    items that `plan_micro_batches` cycles through; or the rows of ``data.source`` (`RecordItems`).

    Raises:
        uniref.data.DatasetError: a source that cannot be opened (missing path, unreadable metadata).
    """
    if data_cfg.source != "synthetic":
        from uniref.data import open_dataset

        records = open_dataset(data_cfg.source, data_cfg.root, data_cfg.keys, data_cfg.allow_outside_root)
        if not len(records):
            from uniref.data import DatasetError

            raise DatasetError(f"data.source {data_cfg.source}: the dataset has no rows")
        return RecordItems(records, data_cfg.length)
    return SyntheticEditDataset(
        split="train",
        length=data_cfg.length or 2**62,
        size=data_cfg.size,
        compose_ratio=data_cfg.compose_ratio,
        num_refs=tuple(data_cfg.num_refs),
        edit_kinds=tuple(data_cfg.edit_kinds or EDIT_KINDS),
        seed=seed,
    )


def sample_tokens(target_hw: tuple[int, int], planned: Sequence[tuple[int, int]], multiple: int) -> int:
    """Image tokens of one sample: its target plus its planned references (one per ``multiple`` px square)."""
    return sum((h // multiple) * (w // multiple) for h, w in [tuple(target_hw), *planned])


def plan_micro_batches(
    dataset: SyntheticEditDataset,
    cursor: int,
    count: int,
    pixel_budget: int,
    budget_mode: str,
    token_budget: int,
    multiple: int = 16,
    skip=None,
) -> tuple[list[MicroBatch], int]:
    """Fills ``count`` micro-batches from the stream at ``cursor``, each up to ``token_budget`` image tokens.

    Samples go in stream order: a micro-batch closes when the next sample would not fit (a sample larger
    than the whole budget goes alone). ``skip(index, error)``: called for a row that cannot be read, which is
    then passed over (without it, the `uniref.data.DatasetError` propagates). Returns the micro-batches and
    the cursor after them.
    """
    from uniref.data import DatasetError

    batches: list[MicroBatch] = []
    current: list[TrainItem] = []
    used, bad_in_a_row = 0, 0
    while True:
        try:
            item = dataset[cursor % len(dataset)]
        except DatasetError as exc:
            if skip is None:
                raise
            skip(cursor % len(dataset), exc)
            cursor += 1
            bad_in_a_row += 1
            if bad_in_a_row >= len(dataset):
                raise DatasetError(f"every row of the dataset is bad (the last: {exc})") from None
            continue
        bad_in_a_row = 0
        item = {**item, "target": _fit_target(item["target"], multiple)}
        planned = plan_reference_sizes(item["reference_sizes"], pixel_budget, multiple=multiple, mode=budget_mode)
        n = sample_tokens(tuple(item["target"].shape[1:]), planned, multiple)
        if current and used + n > token_budget:
            batches.append(MicroBatch(len(batches), current))
            current, used = [], 0
            if len(batches) == count:
                return batches, cursor
        current.append(TrainItem(cursor, item["prompt"], item["target"], item["references"], planned, n))
        used += n
        cursor += 1


def _fit_target(target: Tensor, multiple: int) -> Tensor:
    """A uint8 ``(3, H, W)`` target whose sides are not multiples of ``multiple`` (the model's pixels per token)
    resized to the nearest sides that are, at about the same area (as `uniref.packing.fit_area`)."""
    h, w = target.shape[1:]
    if h % multiple == 0 and w % multiple == 0:
        return target
    th, tw = fit_area((h, w), h * w, multiple)
    pil = Image.fromarray(target.permute(1, 2, 0).numpy()).resize((tw, th), Image.BICUBIC)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).contiguous()


@torch.no_grad()
def encode_micro_batch(pipe, batch: MicroBatch) -> tuple[list[Tensor], list[list[Tensor]]]:
    """VAE latents (normalized as the pipeline normalizes them) of every target and planned reference.

    Images of the same planned size are encoded together. Returns ``(targets, references)``: one
    ``(C, h, w)`` per sample, and per sample one per reference.
    """
    # through PIL, as the pipeline receives images: training and inference resize the same way
    pil = lambda img: Image.fromarray(img.permute(1, 2, 0).numpy())  # noqa: E731
    images, sizes = [], []
    for it in batch.items:
        images += [pil(it.target), *(pil(r) for r in it.references)]
        sizes += [tuple(it.target.shape[1:]), *it.planned]
    latents = pipe.encode_sized(images, sizes)
    targets, refs, k = [], [], 0
    for it in batch.items:
        targets.append(latents[k])
        refs.append(latents[k + 1 : k + 1 + len(it.references)])
        k += 1 + len(it.references)
    return targets, refs
