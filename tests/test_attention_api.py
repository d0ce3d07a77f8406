"""uniref.varlen_attention: every available backend vs a float64 per-sample reference."""

import pytest
import torch

import uniref
from uniref.attention import available_backends, choose_backend
from uniref.ops.attention_reference import varlen_attention_reference
from conftest import DEVICES

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

SEGMENTS = {
    "single": ([5], [5]),
    "length_one": ([1, 1, 3], [1, 2, 1]),
    "empty_samples": ([3, 0, 4, 2], [2, 3, 0, 5]),
    "many_tiny": ([1, 2] * 10, [2, 1] * 10),
    "one_long": ([2, 67, 3], [3, 61, 1]),
}


def make(lq, lk, heads=3, dim=32, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = lambda ls: torch.tensor([0] + ls).cumsum(0).to(torch.int32).to(device)  # noqa: E731
    q, k, v = (torch.randn(sum(n), heads, dim, generator=g).to(device=device, dtype=dtype) for n in (lq, lk, lk))
    return q, k, v, cu(lq), cu(lk), max(lq), max(lk)


def backends(device, dtype):
    return [b for b in available_backends(device, dtype)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("segments", SEGMENTS.values(), ids=SEGMENTS.keys())
@pytest.mark.parametrize("dim", [32, 64, 40])
def test_forward_matches_float64_reference(segments, dtype, device, dim):
    q, k, v, cq, ck, mq, mk = make(*segments, dim=dim, dtype=dtype, device=device)
    ref, ref_lse = varlen_attention_reference(q.double(), k.double(), v.double(), cq, ck)
    # PyTorch's own error in this dtype, as flash-attention judges: ours may be at most 2x it.
    torch_out = varlen_attention_reference(q, k, v, cq, ck, dtype=dtype)[0]
    torch_err = (torch_out.double() - ref).abs().max().item()
    for backend in backends(device, dtype):
        out, lse = uniref.varlen_attention(q, k, v, cq, ck, mq, mk, backend=backend, return_lse=True)
        assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all(), backend
        err = (out.double() - ref).abs().max().item()
        assert err <= 2 * torch_err + 1e-6, (backend, err, torch_err)
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite), backend
        assert (lse[finite] - ref_lse[finite]).abs().max() <= 1e-2 if finite.any() else True


@pytest.mark.parametrize("segments", SEGMENTS.values(), ids=SEGMENTS.keys())
def test_backward_matches_reference(segments):
    q, k, v, cq, ck, mq, mk = make(*segments, dtype=torch.float64)
    grad = torch.randn_like(q)
    expected = torch.autograd.grad(
        (varlen_attention_reference(*(t.requires_grad_() for t in (q, k, v)), cq, ck)[0] * grad).sum(), (q, k, v)
    )
    # FlexAttention has no backward on CPU.
    for backend in [b for b in backends("cpu", torch.float64) if b != "flex"]:
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out = uniref.varlen_attention(*inputs, cq, ck, mq, mk, backend=backend)
        got = torch.autograd.grad((out * grad).sum(), inputs)
        for name, a, b in zip("qkv", got, expected):
            assert torch.allclose(a, b, atol=1e-10), (backend, name)


def test_softmax_scale_and_different_lengths():
    q, k, v, cq, ck, mq, mk = make([4, 2], [1, 6], dtype=torch.float64)
    ref = varlen_attention_reference(q, k, v, cq, ck, softmax_scale=0.3)[0]
    for backend in backends("cpu", torch.float64):
        out = uniref.varlen_attention(q, k, v, cq, ck, mq, mk, softmax_scale=0.3, backend=backend)
        assert torch.allclose(out, ref, atol=1e-10), backend


def test_auto_rule_and_override(monkeypatch):
    monkeypatch.delenv("UNIREF_ATTN_BACKEND", raising=False)
    assert choose_backend("cpu", torch.float32) == available_backends("cpu")[0]
    monkeypatch.setenv("UNIREF_ATTN_BACKEND", "flex")
    assert choose_backend("cpu", torch.float32) == "flex"
    q, k, v, cq, ck, mq, mk = make([3, 4], [3, 4])
    out = uniref.varlen_attention(q, k, v, cq, ck, mq, mk)
    assert torch.allclose(out, varlen_attention_reference(q, k, v, cq, ck)[0], atol=1e-5)


class TestErrors:
    def setup_method(self):
        self.args = make([3, 4], [2, 5])

    def call(self, *args, **kwargs):
        q, k, v, cq, ck, mq, mk = self.args
        base = dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=mq, max_seqlen_k=mk)
        base.update(kwargs)
        return uniref.varlen_attention(**base)

    def test_unknown_backend(self):
        with pytest.raises(ValueError, match="backend must be one of"):
            self.call(backend="xformers")

    def test_unavailable_backend_lists_available(self):
        with pytest.raises(ValueError, match="not available .* available: "):
            self.call(backend="flash_attn")
        with pytest.raises(ValueError, match="needs cuda tensors"):
            self.call(backend="cuda")

    def test_cu_seqlens_dtype_and_values(self):
        q, k, v, cq, ck, mq, mk = self.args
        with pytest.raises(ValueError, match="int32"):
            self.call(cu_seqlens_q=cq.long(), backend="sdpa")
        with pytest.raises(ValueError, match="non-decreasing"):
            self.call(cu_seqlens_q=torch.tensor([0, 5, 3], dtype=torch.int32)[[0, 1, 2]], backend="sdpa")
        with pytest.raises(ValueError, match="longer than its max_seqlen"):
            self.call(max_seqlen_q=2, backend="sdpa")
        with pytest.raises(ValueError, match="last offsets"):
            self.call(cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32), backend="sdpa")

    def test_shapes(self):
        q, k, v, *_ = self.args
        with pytest.raises(ValueError, match="share heads"):
            self.call(k=k[:, :2], v=v[:, :2])
        with pytest.raises(ValueError, match=r"\(total, heads, head_dim\)"):
            self.call(q=q[:, 0])
