"""Served-judge throughput: outputs scored per second against a chat-completions server on 127.0.0.1 that
answers after a simulated 200 ms (a large judge's think time), with `max_concurrency` requests in flight
vs one request at a time, in the same run.

    pytest benchmarks/test_rewards.py --benchmark-columns=median,ops

Each round scores `N` outputs with `REFS` references each: N * (1 + REFS + 1) requests (instruction,
one consistency question per reference, quality). No cache, so every round sends every request.
``extra_info["images_per_s"]`` is N / median round time.
"""

import pytest
import torch
from PIL import Image

from uniref import rewards
from uniref.testing.judge_server import JudgeServer

from ratios import record

N, REFS, LATENCY_S = 4, 2, 0.2


@pytest.fixture(scope="module")
def server():
    with JudgeServer(latency_s=LATENCY_S) as s:
        yield s


@pytest.mark.benchmark(group="rewards-vlm-judge-200ms")
@pytest.mark.parametrize("impl, concurrency", [("one request at a time", 1), ("uniref (32 in flight)", 32)])
def test_vlm_judge_throughput(benchmark, server, impl, concurrency):
    g = torch.Generator().manual_seed(0)
    records = [
        rewards.Record(
            f"put subject {i} on the table", [Image.new("RGB", (64, 64), (50 * j, 10 * i, 99)) for j in range(REFS)]
        )
        for i in range(N)
    ]
    images = torch.rand(N, 3, 64, 64, generator=g)
    judge = rewards.load(
        "vlm_judge", base_url=server.url("latency"), model="simulated-judge", max_concurrency=concurrency, retries=0
    )
    out = benchmark.pedantic(judge, args=(records, images), rounds=3, iterations=1, warmup_rounds=0)
    assert out.shape == (N, 4)
    record(benchmark, "rewards-vlm-judge-200ms", "uniref" if impl.startswith("uniref") else impl)
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = round(N / benchmark.stats.stats.median, 2)
