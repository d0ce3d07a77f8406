"""SELF packing: our op vs the plain-torch reference, pack + unpack of a realistic batch.

8 samples with 1-6 references, 16-channel latents, target 1024^2 and references planned under one
1024^2 budget: about 8k tokens a sample, 65k tokens in all.
"""

import random

import pytest
import torch

import uniref
from uniref.testing.packing import pack_reference, unpack_reference


def realistic_batch(seed=0, samples=8, budget=1024 * 1024, vae=8, channels=16):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(samples):
        refs = [(rng.randrange(384, 1537, 16), rng.randrange(384, 1537, 16)) for _ in range(rng.randint(1, 6))]
        plan = uniref.plan_reference_sizes(refs, budget)
        images = [(1024, 1024)] + plan
        batch.append([torch.randn(channels, h // vae, w // vae, generator=g) for h, w in images])
    return batch


@pytest.fixture(scope="module")
def batch():
    return realistic_batch()


def run_uniref(latents):
    packed = uniref.pack_latents(latents)
    return packed.tokens, uniref.unpack_latents(packed.tokens, packed)


def run_torch(latents):
    tokens, _, _ = pack_reference(latents, 2)
    sizes = [[tuple(x.shape[1:]) for x in s] for s in latents]
    return tokens, unpack_reference(tokens, sizes, 2)


IMPLS = {"uniref": run_uniref, "torch_reference": run_torch}


@pytest.mark.benchmark(group="pack+unpack 8 samples x 1-6 refs @1024^2")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_pack_unpack(benchmark, batch, impl):
    tokens, images = IMPLS[impl](batch)
    ref_tokens, _ = run_torch(batch)
    assert torch.equal(tokens, ref_tokens)
    assert all(torch.equal(a, b.contiguous()) for s, t in zip(batch, images) for a, b in zip(s, t))
    benchmark.extra_info["tokens"] = int(tokens.shape[0])
    benchmark(IMPLS[impl], batch)
