"""GPU check of the edit pipeline: a packed batch equals its samples run one by one, then throughput of
the packed batch vs one call per sample, and one transformer step vs the number of references under
SELF's global budget vs Qwen-Image-Edit-Plus' per-image rule. Usage: python benchmarks/gpu/pipeline.py [--smoke]

Full run: the random-weight `mid` model (1.37B-parameter transformer, Qwen-Image head geometry, bfloat16)
at 1024^2 targets and a 1024^2 reference budget; 8 samples with 1-6 references of 384-1536 px sides.
--smoke runs everything with the `tiny` model at 64^2 on whatever device is present (CPU here), to keep
the script working between GPU sessions.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the shared inputs

from test_pipeline import mixed_samples, reference_images, run_one_by_one, run_packed, step_inputs  # noqa: E402

from uniref.presets import random_edit_pipeline  # noqa: E402

from common import bench_ms, card_header  # noqa: E402


def seconds(fn, reps: int) -> float:
    """Median wall-clock seconds of ``fn()`` over ``reps`` runs after one warm-up (device synchronized)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny model and shapes on the available device")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        size, dtype, steps, reps, sides, refs_counts = "tiny", torch.float32, 2, 1, (32, 96), (1, 2, 4)
    else:
        size, dtype, steps, reps, sides, refs_counts = "mid", torch.bfloat16, 4, 3, (384, 1536), (1, 2, 4, 6, 8)
    diffusers_logging.set_verbosity_error()  # casting random models with .to(dtype) is intended here
    pipe = random_edit_pipeline(size, seed=0).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    budget = pipe.config.target_pixels
    print(
        card_header(
            f"Edit pipeline, random `{size}` model, {str(dtype).split('.')[-1]}, "
            f"target and reference budget {int(budget**0.5)}^2"
        )
    )

    samples, prompts = mixed_samples(8, lo=sides[0], hi=sides[1])
    packed = run_packed(pipe, samples, prompts, steps)
    single = run_one_by_one(pipe, samples, prompts, steps)
    worst = max(float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(packed, single))
    # in float32 the two must agree; in bfloat16 batch shapes change rounding, so the difference is reported only
    assert dtype != torch.float32 or worst <= 1e-4, f"packed batch differs from one-by-one: {worst:.2e} relative"

    t_packed = seconds(lambda: run_packed(pipe, samples, prompts, steps), reps)
    t_single = seconds(lambda: run_one_by_one(pipe, samples, prompts, steps), reps)
    print(f"### 8 mixed samples ({'/'.join(str(len(s)) for s in samples)} references), {steps} steps, CFG 4\n")
    print("| run | transformer forwards / step | s / batch | images / s | speed-up |")
    print("|---|---|---|---|---|")
    print(f"| one call per sample | 8 | {t_single:.3f} | {8 / t_single:.2f} | 1.00 |")
    print(f"| uniref packed batch | 1 | {t_packed:.3f} | {8 / t_packed:.2f} | {t_single / t_packed:.2f} |")
    print(f"\npacked vs one-by-one: max relative difference of the latents {worst:.1e}\n")

    print(f"### One transformer step (CFG off), 1 sample, reference budget {int(budget**0.5)}^2\n")
    print("| refs | global tokens | global ms | per_image tokens | per_image ms | per_image / global time |")
    print("|---|---|---|---|---|---|")
    for k in refs_counts:
        refs = reference_images(k, seed=k, lo=sides[0], hi=sides[1])
        row = []
        for mode in ("global", "per_image"):
            step_args, ref_tokens = step_inputs(pipe, refs, budget, mode)
            with torch.no_grad():
                ms = bench_ms(lambda: pipe.transformer(*step_args))
            row.append((ref_tokens, ms))
        (tg, mg), (tp, mp) = row
        print(f"| {k} | {tg} | {mg:.2f} | {tp} | {mp:.2f} | {mp / mg:.2f} |")
    if dtype == torch.float32:
        print("\ncorrectness: the packed batch matches its samples run one by one on this device")


if __name__ == "__main__":
    main()
