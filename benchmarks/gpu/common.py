"""Shared helpers of the GPU check scripts: the card's name and date, timing, copy bandwidth."""

from __future__ import annotations

import datetime

import torch


def card_header(title: str) -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke run)"
    return f"## {title}\n\ncard: {name}; torch {torch.__version__}; date: {datetime.date.today().isoformat()}\n"


def bench_ms(fn, warmup: int = 10, rep: int = 50) -> float:
    """Median wall-clock milliseconds per call of `fn` (triton's do_bench on CUDA, perf_counter otherwise)."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    import time

    for _ in range(2):
        fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def copy_bandwidth_gbs(nbytes: int, device) -> float:
    """Device-to-device copy speed (bytes read + written per second) for a buffer of `nbytes`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6
