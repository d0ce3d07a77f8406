"""Synthetic world throughput: task generation (the bar: >= 2000 tasks/s on one core at 64x64) and reward
scoring, each beside a trivial peer in the same run.

    pytest benchmarks/test_synthetic.py --benchmark-columns=mean,ops

Each round generates (or scores) `N` items; ``extra_info["items_per_s"]`` is N / mean round time.
Everything here runs on one thread: generation is numpy + Python, scoring avoids threaded BLAS, and
torch (the MSE peer) is held to one thread for the module.
"""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from uniref.synthetic import FAMILIES, SyntheticEditDataset, sample_task, score_batch
from uniref.synthetic.bench import BASELINES

N = 200


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _record(benchmark, n: int) -> None:
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["items_per_s"] = round(n / benchmark.stats.stats.mean)


def _mixed_tasks() -> None:
    for i in range(N):
        sample_task(i, "edit" if i % 2 else "compose")  # half edits, half compositions with K = 2..6


@pytest.mark.benchmark(group="synthetic-generation")
def test_generate_mixed_tasks(benchmark):
    benchmark(_mixed_tasks)
    _record(benchmark, N)


@pytest.mark.benchmark(group="synthetic-generation")
def test_generate_compositions_k6(benchmark):
    benchmark(lambda: [sample_task(i, "compose", 6) for i in range(N)])  # the slowest kind: 6 images + target
    _record(benchmark, N)


@pytest.mark.benchmark(group="synthetic-generation")
def test_generate_dataset_items(benchmark):
    ds = SyntheticEditDataset("train", length=N, compose_ratio=0.5)
    benchmark(lambda: [ds[i] for i in range(N)])  # the training path: uint8 tensors, no PIL
    _record(benchmark, N)


def _pillow_one_shape_per_task() -> None:
    for i in range(N):
        im = Image.new("RGB", (64, 64), (200, 200, 200))
        ImageDraw.Draw(im).ellipse((10 + i % 20, 12, 30 + i % 20, 32), fill=(215, 25, 25))


@pytest.mark.benchmark(group="synthetic-generation")
def test_peer_pillow_one_shape_per_task(benchmark):
    """The floor: Pillow drawing one ellipse on one 64x64 image per task, nothing else."""
    benchmark(_pillow_one_shape_per_task)
    _record(benchmark, N)


@pytest.fixture(scope="module")
def scoring_batch():
    tasks = [sample_task(i, FAMILIES[i % len(FAMILIES)], split="test") for i in range(64)]
    outputs = torch.stack([torch.from_numpy(np.array(BASELINES["copy_first"](t))).permute(2, 0, 1) for t in tasks])
    return tasks, outputs.float() / 255.0


@pytest.mark.benchmark(group="synthetic-rewards")
def test_score_batch_64(benchmark, scoring_batch):
    tasks, outputs = scoring_batch
    r = benchmark(score_batch, tasks, outputs)
    assert r.shape == (64, 3)
    _record(benchmark, 64)


@pytest.mark.benchmark(group="synthetic-rewards")
def test_peer_pixel_mse_64(benchmark, scoring_batch):
    """The floor: mean squared error against the targets (what a reward without scene knowledge costs)."""
    tasks, outputs = scoring_batch
    targets = torch.stack([torch.from_numpy(np.array(t.target)).permute(2, 0, 1) for t in tasks]).float() / 255.0
    benchmark(lambda: ((outputs - targets) ** 2).mean(dim=(1, 2, 3)))
    _record(benchmark, 64)
