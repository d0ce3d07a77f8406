"""Varlen attention on CPU: uniref's kernel vs its peers, measured in the same run.

A packed batch shaped like a scaled-down SELF batch: 4 samples of 311-1187 tokens, 8 heads x 64, fp32.
Forward, and forward + backward (grads of q, k, v), for:
* uniref: `varlen_attention(backend="cpu")`, the C++ kernel;
* sdpa_per_sample: one `scaled_dot_product_attention` call per sample (`backend="sdpa"`, PyTorch's
  fused CPU flash kernel);
* sdpa_padded_mask: pad to the longest sample, one batched SDPA call with a key mask, unpad;
* flex_compiled: FlexAttention with a document mask, compiled (`backend="flex"`; its block mask is
  cached after the first call, as in a model whose layers share one batch). Forward only: FlexAttention
  has no backward on CPU.

The GPU comparison is benchmarks/gpu/attention.py. Each uniref entry stores the peers' median / ours in
extra_info["speedup_vs"] once every entry of its group has run (benchmarks/conftest.py prints them).
"""

import pytest
import torch

import uniref
from uniref.testing.attention import make_varlen_inputs, varlen_attention_reference

from attention_peers import attention_flops, fwd_bwd_step, padded_sdpa_attention
from ratios import record

LENGTHS = (1187, 311, 903, 642)
HEADS, HEAD_DIM = 8, 64


def by_backend(backend):
    def run(q, k, v, cq, ck, mq, mk):
        return uniref.varlen_attention(q, k, v, cq, ck, mq, mk, backend=backend)

    return run


def padded(q, k, v, cq, ck, mq, mk):
    return padded_sdpa_attention(q, k, v, cq, ck)


# Peers first, ours last: its ratios need the peers' medians.
IMPLS = {
    "sdpa_per_sample": by_backend("sdpa"),
    "sdpa_padded_mask": padded,
    "flex_compiled": by_backend("flex"),
    "uniref": by_backend("cpu"),
}


@pytest.fixture(scope="module")
def batch():
    return make_varlen_inputs(LENGTHS, heads=HEADS, head_dim=HEAD_DIM, dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(batch):
    q, k, v, cq, ck, _, _ = batch
    return varlen_attention_reference(q.double(), k.double(), v.double(), cq, ck)[0]


def describe(benchmark, passes: float) -> None:
    benchmark.extra_info["lengths"] = list(LENGTHS)
    benchmark.extra_info["gflop"] = round(passes * attention_flops(LENGTHS, LENGTHS, HEADS, HEAD_DIM) / 1e9, 2)
    benchmark.extra_info["threads"] = torch.get_num_threads()


@pytest.mark.benchmark(group="varlen attention fwd, 4 samples 311-1187 tok, 8x64 fp32 (CPU)")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward(benchmark, batch, reference, impl):
    fn = IMPLS[impl]
    with torch.no_grad():
        out = fn(*batch)  # also the warm-up (flex compiles here)
        assert (out.double() - reference).abs().max() < 1e-5
        describe(benchmark, 1.0)
        benchmark(fn, *batch)
    record(benchmark, "fwd", impl)


@pytest.mark.benchmark(group="varlen attention fwd+bwd, 4 samples 311-1187 tok, 8x64 fp32 (CPU)")
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "flex_compiled"])  # no FlexAttention backward on CPU
def test_forward_backward(benchmark, batch, impl):
    fn = IMPLS[impl]
    q, k, v, *rest = batch
    step, leaves, grad = fwd_bwd_step(fn, q, k, v, *rest)
    step()
    expected = [t.detach().double().requires_grad_() for t in (q, k, v)]
    varlen_attention_reference(*expected, *rest[:2])[0].backward(grad.double())
    for got, want in zip(leaves, expected):
        assert (got.grad.double() - want.grad).abs().max() < 1e-4
    describe(benchmark, 3.5)
    benchmark(step)
    record(benchmark, "fwd+bwd", impl)
