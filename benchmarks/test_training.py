"""SFT step throughput: packed varlen micro-batches (ours) vs padded batches of the same samples (the peer).

The samples are the training stream's (`uniref.training.data`): single-image edits and 2-6 reference
compositions, references planned under one pixel budget, prompts of their natural lengths. One step is
the flow-matching loss's forward and backward through the `small` model (the optimizer step costs the
same in both and is left out).

The peer pads every sample to the batch's longest image stream (zero tokens, as an extra image) and
longest prompt (trailing spaces) and runs the same model on the same kernels. Its pads attend without a
mask, so this peer pays only for the extra tokens, not for a masked attention's slower path: a lower
bound on what padding costs. extra_info records real and padded token counts.
"""

import pytest
import torch

from uniref.packing import pack_latents
from uniref.presets import random_edit_pipeline
from uniref.training.config import DataConfig
from uniref.training.data import MicroBatch, encode_micro_batch, make_dataset, plan_micro_batches
from uniref.training.modules import EditModel, PromptBatch

from ratios import record

SAMPLES = 8
SIZE = 128  # target side: 64 tokens at the small model's 16 px per token
BUDGET = 2 * SIZE * SIZE  # reference pixels per sample (SELF)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    pipe = random_edit_pipeline("small", seed=0)
    model = EditModel(pipe.transformer.train(), pipe.text_encoder, train_text_encoder=True)
    data = make_dataset(DataConfig(size=SIZE, compose_ratio=0.5, num_refs=[2, 6]), seed=0)
    # a token budget of 1 closes a micro-batch after every sample: the stream's first SAMPLES samples
    singles, _ = plan_micro_batches(data, 0, SAMPLES, BUDGET, "global", token_budget=1, multiple=16)
    batch = MicroBatch(0, [b.items[0] for b in singles])
    x0, refs = encode_micro_batch(pipe, batch)
    return pipe, model, batch, x0, refs


def _inputs(pipe, batch, x0, refs, padded: bool):
    p = pipe.patch_size
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(z.shape, generator=g) for z in x0]
    t = torch.full((len(x0),), 0.5)
    noisy = [(1 - 0.5) * z + 0.5 * e for z, e in zip(x0, noise)]
    samples = [[xt, *r] for xt, r in zip(noisy, refs)]
    prompts = [it.prompt for it in batch.items]
    if padded:
        lengths = [sum((z.shape[1] // p) * (z.shape[2] // p) for z in s) for s in samples]
        longest = max(lengths)
        c = x0[0].shape[0]
        samples = [s + [torch.zeros(c, p, p * (longest - n))] if n < longest else s for s, n in zip(samples, lengths)]
        width = max(len(q.encode()) for q in prompts)
        prompts = [q + " " * (width - len(q.encode())) for q in prompts]
    packed = pack_latents(samples, patch_size=p)
    target = pack_latents([[e - z] for z, e in zip(x0, noise)], patch_size=p).tokens
    return packed, prompts, t, target


def _step(model, packed, prompts, t, target):
    model.zero_grad(set_to_none=True)
    pred = model(packed.tokens, t, packed.layout, PromptBatch(prompts, [[] for _ in prompts]))
    torch.nn.functional.mse_loss(pred, target).backward()


@pytest.mark.parametrize("impl", ["padded", "uniref"])
def test_sft_step_packed_vs_padded(benchmark, setup, impl):
    pipe, model, batch, x0, refs = setup
    benchmark.group = f"SFT step (fwd+bwd), {SAMPLES} mixed samples"
    packed, prompts, t, target = _inputs(pipe, batch, x0, refs, padded=impl == "padded")
    real = batch.tokens + sum(len(it.prompt.encode()) + 1 for it in batch.items)
    computed = packed.tokens.shape[0] + sum(len(q.encode()) + 1 for q in prompts)
    benchmark.extra_info.update(
        real_tokens=real, computed_tokens=computed, samples=SAMPLES, refs=[len(it.references) for it in batch.items]
    )
    if impl == "uniref":
        assert computed == real  # packed: no token computed that is not a sample's
    benchmark.pedantic(_step, args=(model, packed, prompts, t, target), rounds=7, iterations=1, warmup_rounds=1)
    record(benchmark, benchmark.group, impl)
