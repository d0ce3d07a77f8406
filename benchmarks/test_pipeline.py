"""The edit pipeline: what SELF's global budget and packed batching buy, measured against their peers in
the same run (random-weight `small` model on the CPU; `benchmarks/gpu/pipeline.py` runs `mid` on a GPU).

(a) One transformer step vs the number of references (1-8) at a fixed pixel budget: `global` (SELF, ours)
    vs `per_image` (Qwen-Image-Edit-Plus' rule). extra_info records the tokens: flat vs linear growth.
(b) A packed batch of 8 mixed samples (1-6 references of different sizes, each its own output size and
    prompt) in one call vs the same samples one call each, as diffusers' Qwen edit pipeline must run them.
"""

import random

import numpy as np
import PIL.Image
import pytest
import torch

import uniref
from uniref.presets import random_edit_pipeline

REFS = (1, 2, 4, 6, 8)
MODES = {"uniref_global": "global", "per_image": "per_image"}


def reference_images(count, seed=0, lo=192, hi=640):
    """``count`` random RGB images with random sizes (multiples of 16 in [lo, hi])."""
    rng = random.Random(seed)
    data = np.random.default_rng(seed)
    sizes = [(rng.randrange(lo, hi + 1, 16), rng.randrange(lo, hi + 1, 16)) for _ in range(count)]
    return [PIL.Image.fromarray(data.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def mixed_samples(count=8, seed=0, max_refs=6, lo=192, hi=640):
    """``count`` samples of 1..max_refs references each, with their prompts."""
    rng = random.Random(seed)
    samples = [reference_images(rng.randint(1, max_refs), seed=seed + 1 + i, lo=lo, hi=hi) for i in range(count)]
    prompts = [
        f"sample {i}: put " + ", ".join(f"picture {k + 1}" for k in range(len(s))) + " together"
        for i, s in enumerate(samples)
    ]
    return samples, prompts


def step_inputs(pipe, refs, budget, mode, target=None):
    """The transformer's inputs for one denoising step of one sample (random latents at the planned sizes).

    Returns ``(args, ref_tokens)`` with ``args`` for ``pipe.transformer(*args)``.
    """
    f, p = pipe.vae_scale_factor, pipe.patch_size
    (th, tw), planned = pipe.plan_sizes([refs], budget, mode, *(target or (None, None)))[0]
    g = torch.Generator().manual_seed(0)
    c, dtype, device = pipe.latent_channels, pipe.transformer.dtype, pipe.transformer.device
    latents = [torch.randn(c, h // f, w // f, generator=g).to(device, dtype) for h, w in [(th, tw), *planned]]
    tokens, layout = uniref.pack_latents([latents], patch_size=p)
    with torch.no_grad():
        embeds, lengths = pipe.encode_prompt(["compose the pictures"], [refs], device, dtype)
    t = torch.full((1,), 0.5, device=device, dtype=dtype)
    return (tokens, embeds, t, layout, lengths), layout.reference_lengths[0]


@pytest.fixture(scope="module")
def pipe():
    pipe = random_edit_pipeline("small", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("refs", REFS)
@pytest.mark.parametrize("impl", list(MODES))  # applied first, so the id reads "uniref_global-4" (conftest)
def test_step_vs_references(benchmark, pipe, refs, impl):
    benchmark.group = f"transformer step, {refs} refs, budget 256^2"
    budget = pipe.config.target_pixels  # 256^2 for the small model
    args, ref_tokens = step_inputs(pipe, reference_images(refs), budget, MODES[impl])
    _, per_image_tokens = step_inputs(pipe, reference_images(refs), budget, "per_image")
    benchmark.extra_info.update(
        refs=refs,
        mode=MODES[impl],
        ref_tokens=ref_tokens,
        seq_tokens=args[3].max_seqlen + args[4][0],  # (tokens, embeds, t, layout, text_lengths)
        per_image_over_this_tokens=round(per_image_tokens / ref_tokens, 2),
    )
    if MODES[impl] == "global":
        assert ref_tokens <= budget // 256
    with torch.no_grad():
        benchmark.pedantic(pipe.transformer, args=args, rounds=9, iterations=1, warmup_rounds=1)


def run_packed(pipe, samples, prompts, steps):
    return pipe(
        samples,
        prompts,
        num_inference_steps=steps,
        output_type="latent",
        generator=[torch.Generator().manual_seed(i) for i in range(len(samples))],
    ).images


def run_one_by_one(pipe, samples, prompts, steps):
    kw = dict(num_inference_steps=steps, output_type="latent")
    return [
        pipe(s, p, generator=torch.Generator().manual_seed(i), **kw).images[0]
        for i, (s, p) in enumerate(zip(samples, prompts))
    ]


BATCH_IMPLS = {"uniref_packed": run_packed, "one_by_one": run_one_by_one}


@pytest.mark.benchmark(group="8 mixed samples (1-6 refs), 2 steps + CFG, small model")
@pytest.mark.parametrize("impl", list(BATCH_IMPLS))
def test_packed_batch_vs_one_by_one(benchmark, pipe, impl):
    samples, prompts = mixed_samples()
    steps = 2
    if impl == "uniref_packed":  # same results as the peer, checked once
        packed = run_packed(pipe, samples, prompts, steps)
        single = run_one_by_one(pipe, samples, prompts, steps)
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(packed, single))
    plans = pipe.plan_sizes(samples, pipe.config.target_pixels, "global", None, None)
    tokens = [(th // 16) * (tw // 16) + sum((h // 16) * (w // 16) for h, w in refs) for (th, tw), refs in plans]
    benchmark.extra_info.update(
        samples=len(samples),
        refs=[len(s) for s in samples],
        image_tokens=tokens,
        forwards_per_step=1 if impl == "uniref_packed" else len(samples),
    )
    benchmark.pedantic(BATCH_IMPLS[impl], args=(pipe, samples, prompts, steps), rounds=3, iterations=1)
