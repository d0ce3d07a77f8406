"""`uniref data check`: read every row of a dataset and report what training will see, and every bad row.

The summary: rows, references per row, image sizes, prompt lengths, and the image tokens per sample under
each pixel budget with SELF's one global budget and with one budget per reference (Qwen-Image-Edit-Plus'
sizing). Bad rows (a missing, empty, truncated or undecodable file, a decompression bomb, an empty prompt,
no target where a target is required) are listed with their row, id, file and reason.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from uniref.data.readers import open_dataset
from uniref.data.records import DatasetError
from uniref.packing import fit_area, plan_reference_sizes

__all__ = ["DatasetReport", "check_dataset"]


@dataclass
class DatasetReport:
    """What `check_dataset` found; ``bad`` holds ``(row, reason)`` for every row that cannot train."""

    rows: int = 0
    references: Counter = field(default_factory=Counter)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    prompt_chars: list[int] = field(default_factory=list)
    tokens: dict[tuple[int, str], list[int]] = field(default_factory=dict)
    bad: list[tuple[int, str]] = field(default_factory=list)

    def format(self) -> str:
        """The report as text (what `uniref data check` prints)."""
        good = self.rows - len(self.bad)
        lines = [f"{self.rows} rows, {good} readable, {len(self.bad)} bad"]
        if self.references:
            hist = ", ".join(f"{k}: {n}" for k, n in sorted(self.references.items()))
            lines.append(f"references per row: {hist}")
        if self.widths:
            lines.append(
                f"image sizes (h x w): {min(self.heights)}-{max(self.heights)} x {min(self.widths)}-"
                f"{max(self.widths)}, median {statistics.median(self.heights):.0f} x "
                f"{statistics.median(self.widths):.0f}"
            )
        if self.prompt_chars:
            lines.append(
                f"prompt length (characters): {min(self.prompt_chars)}-{max(self.prompt_chars)}, median "
                f"{statistics.median(self.prompt_chars):.0f}"
            )
        for (budget, mode), counts in sorted(self.tokens.items()):
            if counts:
                lines.append(
                    f"image tokens per sample at {budget} px ({mode}): mean {statistics.mean(counts):.0f}, "
                    f"max {max(counts)}"
                )
        lines += [f"bad row {row}: {reason}" for row, reason in self.bad]
        return "\n".join(lines)


def check_dataset(
    spec: str,
    root: str | None = None,
    keys: dict | None = None,
    pixel_budgets: Sequence[int] = (1024 * 1024,),
    multiple: int = 16,
    require_target: bool = True,
    allow_outside_root: bool = False,
    progress: bool = False,
) -> DatasetReport:
    """Reads every row of ``spec`` (see `uniref.data.open_dataset`) and returns a `DatasetReport`.

    ``require_target``: a row without a target is bad (an SFT set); ``multiple``: the model's pixels per token
    side (VAE factor x patch). Raises `DatasetError` only when the dataset itself cannot be opened.
    """
    data = open_dataset(spec, root, keys, allow_outside_root)
    report = DatasetReport(rows=len(data))
    rows = range(len(data))
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, desc="data check", unit="row")
    for i in rows:
        try:
            record = data[i]
            if not record.prompt.strip():
                raise DatasetError(f"id {record.id}: empty prompt")
            if require_target and record.target is None:
                raise DatasetError(f"id {record.id}: no target image, which supervised training needs")
            refs = record.reference_images()
            target = record.target_image()
        except DatasetError as exc:
            report.bad.append((i, str(exc)))
            continue
        report.references[len(refs)] += 1
        report.prompt_chars.append(len(record.prompt))
        for img in refs + ([target] if target is not None else []):
            report.heights.append(img.height)
            report.widths.append(img.width)
        target_hw = fit_area((target.height, target.width), target.height * target.width, multiple) if target else None
        for budget in pixel_budgets:
            for mode in ("global", "per_image"):
                sizes = [(r.height, r.width) for r in refs]
                planned = plan_reference_sizes(sizes, budget, multiple, mode) if refs else []
                images = planned + ([target_hw] if target_hw else [])
                report.tokens.setdefault((budget, mode), []).append(
                    sum((h // multiple) * (w // multiple) for h, w in images)
                )
    return report
