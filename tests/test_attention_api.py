"""uniref.varlen_attention: every backend vs the float64 reference, the "auto" rule, argument errors."""

import dataclasses

import pytest
import torch

import uniref
from uniref import attention_backends
from uniref.attention import BACKENDS, CUDA_DTYPES, CUDA_HEAD_DIMS, auto_backend, available_backends, unavailable_reason
from uniref.testing import DEVICES
from uniref.testing.attention import make_varlen_inputs, varlen_attention_reference

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

SEGMENTS = {
    "length_one": ([1, 1, 3], [1, 2, 1]),
    "empty_samples": ([3, 0, 4, 2, 0], [2, 3, 0, 5, 0]),
    "many_tiny": ([1, 2] * 10, [2, 1] * 10),
    "one_long": ([2, 67, 3], [3, 61, 1]),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("segments", SEGMENTS.values(), ids=SEGMENTS.keys())
def test_every_backend_forward(segments, dtype, device):
    """out within 2x SDPA's error of the float64 reference, lse within fp32 rounding, -inf where no keys."""
    q, k, v, cq, ck, mq, mk = make_varlen_inputs(*segments, heads=3, head_dim=64, dtype=dtype, device=device)
    ref, ref_lse = varlen_attention_reference(q.double(), k.double(), v.double(), cq, ck)
    budget = 2 * max_err(uniref.varlen_attention(q, k, v, cq, ck, mq, mk, backend="sdpa"), ref)
    budget += 2e-6 if dtype == torch.float32 else 0.0
    finite = torch.isfinite(ref_lse)
    for backend in available_backends(device, dtype, 64):
        # (flex with return_lse runs unfused on CPU: the compiled path is tested below.)
        out, lse = uniref.varlen_attention(q, k, v, cq, ck, mq, mk, backend=backend, return_lse=True)
        assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous(), backend
        assert torch.isfinite(out).all(), backend
        assert max_err(out, ref) <= budget, (backend, max_err(out, ref), budget)
        assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape, backend
        assert torch.equal(torch.isfinite(lse), finite) and (lse[~finite] == float("-inf")).all(), backend
        assert max_err(lse[finite], ref_lse[finite]) <= 1e-5, backend


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flex_compiled_forward(dtype):
    q, k, v, cq, ck, mq, mk = make_varlen_inputs([5, 0, 70, 3], [9, 4, 61, 0], heads=2, head_dim=32, dtype=dtype)
    ref = varlen_attention_reference(q.double(), k.double(), v.double(), cq, ck)[0]
    budget = 2 * max_err(uniref.varlen_attention(q, k, v, cq, ck, mq, mk, backend="sdpa"), ref) + 2e-6
    with torch.no_grad():
        out = uniref.varlen_attention(q, k, v, cq, ck, mq, mk, backend="flex")
    assert max_err(out, ref) <= budget


@pytest.mark.parametrize("device", DEVICES)
def test_every_backend_backward(device):
    dtype = torch.float64 if device == "cpu" else torch.bfloat16
    q, k, v, cq, ck, mq, mk = make_varlen_inputs([3, 0, 40, 1], [5, 2, 33, 0], heads=2, head_dim=64, dtype=dtype,
                                                 device=device)  # fmt: skip
    grad = torch.randn_like(q)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(varlen_attention_reference(*leaves, cq, ck)[0], leaves, grad.double())
    backends = [b for b in available_backends(device, dtype, 64) if not (b == "flex" and device == "cpu")]
    for backend in backends:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = uniref.varlen_attention(*leaves, cq, ck, mq, mk, backend=backend)
        for name, got, want in zip("qkv", torch.autograd.grad(out, leaves, grad), expected):
            tol = 1e-6 if dtype == torch.float64 else 5e-2
            assert max_err(got, want) <= tol, (backend, name, max_err(got, want))


def test_flex_on_cpu_refuses_gradients_clearly():
    q, k, v, cq, ck, mq, mk = make_varlen_inputs([3], [3], heads=1, head_dim=16)
    with pytest.raises(RuntimeError, match="backend='flex' cannot differentiate on CPU"):
        uniref.varlen_attention(q.requires_grad_(), k, v, cq, ck, mq, mk, backend="flex")


def test_softmax_scale_and_non_contiguous_last_dim():
    q, k, v, cq, ck, mq, mk = make_varlen_inputs([4, 2], [1, 6], heads=2, head_dim=8, dtype=torch.float64)
    ref = varlen_attention_reference(q, k, v, cq, ck, softmax_scale=0.3)[0]
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, last dim strided
    for backend in ("cpu", "sdpa"):
        out = uniref.varlen_attention(q_t, k, v, cq, ck, mq, mk, softmax_scale=0.3, backend=backend)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


class TestAutoRule:
    def test_cpu_picks_our_kernel(self, monkeypatch):
        monkeypatch.delenv("UNIREF_ATTN_BACKEND", raising=False)
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            assert auto_backend("cpu", dtype, 40) == "cpu"

    def test_cuda_order(self, monkeypatch):
        monkeypatch.delenv("UNIREF_ATTN_BACKEND", raising=False)
        monkeypatch.setitem(attention_backends._HAS_KERNEL, "cuda", True)
        monkeypatch.setattr(attention_backends, "_FLASH_ATTN_INSTALLED", True)
        assert auto_backend("cuda", torch.bfloat16, 128) == "cuda"
        assert auto_backend("cuda", torch.bfloat16, 96) == "flash_attn"  # not a head dim of our kernel
        assert auto_backend("cuda", torch.float32, 128) == "sdpa"  # neither takes fp32
        monkeypatch.setattr(attention_backends, "_FLASH_ATTN_INSTALLED", False)
        assert auto_backend("cuda", torch.float16, 96) == "sdpa"
        monkeypatch.setitem(attention_backends._HAS_KERNEL, "cuda", False)
        assert auto_backend("cuda", torch.float16, 128) == "sdpa"

    def test_cuda_long_samples_take_sdpa(self, monkeypatch):
        """Long samples go to one SDPA call per sample (cuDNN), earlier without gradients than with."""
        monkeypatch.delenv("UNIREF_ATTN_BACKEND", raising=False)
        monkeypatch.setitem(attention_backends._HAS_KERNEL, "cuda", True)
        inference = attention_backends.SDPA_MIN_TOKENS_INFERENCE
        training = attention_backends.SDPA_MIN_TOKENS_TRAINING
        assert inference < training
        assert auto_backend("cuda", torch.bfloat16, 128, inference - 1) == "cuda"
        assert auto_backend("cuda", torch.bfloat16, 128, inference) == "sdpa"
        assert auto_backend("cuda", torch.bfloat16, 128, inference, needs_grad=True) == "cuda"
        assert auto_backend("cuda", torch.bfloat16, 128, training, needs_grad=True) == "sdpa"
        assert auto_backend("cpu", torch.bfloat16, 128, training) == "cpu"

    def test_varlen_attention_passes_the_shape_to_the_rule(self, monkeypatch):
        seen = []
        real = attention_backends.auto_backend
        monkeypatch.setattr(uniref.attention, "auto_backend", lambda *a: seen.append(a[3:]) or real(*a))
        q, k, v, cq, ck, mq, mk = make_varlen_inputs([3, 5], [4, 8], heads=2, head_dim=16)
        uniref.varlen_attention(q, k, v, cq, ck, mq, mk)
        uniref.varlen_attention(q.requires_grad_(), k, v, cq, ck, mq, mk)
        with torch.no_grad():
            uniref.varlen_attention(q, k, v, cq, ck, mq, mk)
        assert seen == [(5.0, False), (5.0, True), (5.0, False)]  # (8 + 12) rows / (2 * 2 samples)

    def test_environment_overrides(self, monkeypatch):
        q, k, v, cq, ck, mq, mk = make_varlen_inputs([3, 4], [3, 4], heads=2, head_dim=16)
        calls = []
        real = attention_backends.get_backend("sdpa")
        counted = dataclasses.replace(real, run=lambda *a: calls.append(1) or real.run(*a))
        monkeypatch.setitem(attention_backends._REGISTRY, "sdpa", counted)
        monkeypatch.setenv("UNIREF_ATTN_BACKEND", "sdpa")
        out = uniref.varlen_attention(q, k, v, cq, ck, mq, mk)
        assert calls and torch.allclose(out, varlen_attention_reference(q, k, v, cq, ck)[0], atol=1e-6)
        monkeypatch.setenv("UNIREF_ATTN_BACKEND", "auto")
        assert auto_backend("cpu", torch.float32, 16) == "cpu"

    def test_environment_errors(self, monkeypatch):
        q, k, v, cq, ck, mq, mk = make_varlen_inputs([3], [3], heads=1, head_dim=16)
        monkeypatch.setenv("UNIREF_ATTN_BACKEND", "xformers")
        with pytest.raises(ValueError, match="UNIREF_ATTN_BACKEND='xformers' is not a varlen_attention backend"):
            uniref.varlen_attention(q, k, v, cq, ck, mq, mk)
        monkeypatch.setenv("UNIREF_ATTN_BACKEND", "cuda")
        with pytest.raises(ValueError, match=r"'cuda' \(UNIREF_ATTN_BACKEND is set to it\) is not available"):
            uniref.varlen_attention(q, k, v, cq, ck, mq, mk)


class TestErrors:
    def call(self, backend="auto", **override):
        q, k, v, cq, ck, mq, mk = make_varlen_inputs([3, 4], [2, 5], heads=2, head_dim=16)
        base = dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=mq, max_seqlen_k=mk)
        base.update(override)
        return uniref.varlen_attention(**base, backend=backend)

    def test_unknown_backend(self):
        with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \('cpu', 'cuda'"):
            self.call(backend="xformers")

    def test_unavailable_backend_says_why_and_lists_available(self):
        with pytest.raises(ValueError, match=r"'cuda' is not available .* runs CUDA tensors.*available: \['cpu'"):
            self.call(backend="cuda")
        if not attention_backends._FLASH_ATTN_INSTALLED:
            with pytest.raises(ValueError, match="flash_attn is not installed"):
                self.call(backend="flash_attn")
        q, k, v, cq, ck, mq, mk = make_varlen_inputs([3], [3], heads=1, head_dim=16, dtype=torch.float64)
        with pytest.raises(ValueError, match="FlexAttention does not take float64"):
            uniref.varlen_attention(q, k, v, cq, ck, mq, mk, backend="flex")

    @pytest.mark.parametrize(
        "override, match",
        [
            (dict(k=torch.zeros(7, 1, 16), v=torch.zeros(7, 1, 16)), "q has 2 heads but k/v have 1"),
            (dict(k=torch.zeros(7, 2, 8), v=torch.zeros(7, 2, 8)), "q has head_dim 16 but k/v have 8"),
            (dict(v=torch.zeros(7, 2, 8)), "k and v must have the same shape"),
            (dict(q=torch.zeros(7, 16)), r"q must be a \(total, heads, head_dim\) tensor, got \(7, 16\)"),
            (dict(q=torch.zeros(7, 2, 16, dtype=torch.int32)), "must share one of"),
            (
                dict(k=torch.zeros(7, 2, 16, dtype=torch.float64), v=torch.zeros(7, 2, 16, dtype=torch.float64)),
                "must share one of",
            ),  # fmt: skip
            (dict(cu_seqlens_q=torch.tensor([0, 3, 7])), "cu_seqlens_q must be a 1-D int32 tensor"),
            (dict(cu_seqlens_k=torch.tensor([0, 7], dtype=torch.int32)), "both need B\\+1"),
            (dict(cu_seqlens_q=torch.zeros(3, dtype=torch.int32, device="meta")), "is on meta but q is on cpu"),
            (dict(max_seqlen_q=4.0), "max_seqlen_q must be a non-negative Python int"),
            (dict(softmax_scale=float("inf")), "softmax_scale must be finite"),
        ],
        ids=[
            "heads",
            "head_dim",
            "k_v_shapes",
            "q_2d",
            "int_dtype",
            "mixed_dtypes",
            "cu_int64",
            "batch_mismatch",
            "cu_other_device",
            "max_float",
            "scale_inf",
        ],  # fmt: skip
    )
    def test_arguments(self, override, match):
        with pytest.raises(ValueError, match=match):
            self.call(**override)

    @pytest.mark.parametrize("backend", ["cpu", "sdpa", "flex"])
    @pytest.mark.parametrize(
        "override, match",
        [
            (dict(cu_seqlens_q=torch.tensor([0, 5, 3], dtype=torch.int32), max_seqlen_q=9), "non-decreasing"),
            (dict(cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32)), r"must equal the number of rows, 7"),
            (dict(max_seqlen_k=4), "more than max_seqlen=4"),
        ],
        ids=["non_monotonic", "last_not_total", "longer_than_max"],
    )
    def test_offsets_on_every_host_checked_backend(self, backend, override, match):
        # Same message on every backend; the op raises RuntimeError (TORCH_CHECK), Python ValueError.
        with pytest.raises((ValueError, RuntimeError), match=match), torch.no_grad():
            self.call(backend=backend, **override)


def test_backends_constant_lists_every_backend():
    assert set(BACKENDS) == {"cpu", "cuda", "flash_attn", "sdpa", "flex"}
    assert available_backends("cpu", torch.float32)[:1] == ["cpu"]


class TestRegistry:
    """BACKENDS, available_backends, the reasons and the run table all come from one registration each."""

    def test_every_name_comes_from_the_registry(self):
        registry = attention_backends._REGISTRY
        assert BACKENDS == tuple(registry)
        for name in BACKENDS:
            backend = attention_backends.get_backend(name)
            assert backend.name == name and callable(backend.run)
        for device in ("cpu", "cuda"):
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                for head_dim in (40, 64, 512):
                    expected = [n for n in BACKENDS if registry[n].unavailable_reason(device, dtype, head_dim) is None]
                    assert available_backends(device, dtype, head_dim) == expected
        with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
            attention_backends.get_backend("xformers")

    def test_a_backend_registers_once(self):
        with pytest.raises(ValueError, match="attention backend 'sdpa' is registered twice"):
            attention_backends.register_backend("sdpa", label="SDPA")(lambda *a: None)
        assert attention_backends._REGISTRY["sdpa"].run is attention_backends._sdpa

    def test_cuda_constraints_come_from_the_compiled_extension(self):
        from uniref import _C

        assert CUDA_HEAD_DIMS == tuple(_C.cuda_attention_head_dims) == (32, 64, 128)
        assert CUDA_DTYPES == (torch.float16, torch.bfloat16)
        cuda = attention_backends.get_backend("cuda")
        assert cuda.dtypes == CUDA_DTYPES and all(cuda.head_dim_ok(d) for d in CUDA_HEAD_DIMS)
        assert not cuda.head_dim_ok(96)

    def test_reason_names_every_broken_constraint(self, monkeypatch):
        monkeypatch.setitem(attention_backends._HAS_KERNEL, "cuda", False)
        reason = unavailable_reason("cuda", "cpu", torch.float32, 48)
        for part in (
            "runs CUDA tensors, these are on cpu",
            "built without its CUDA kernels",
            "does not take float32 (it takes float16/bfloat16)",
            "supports head_dim in (32, 64, 128), got 48",
        ):
            assert part in reason, (part, reason)
        assert unavailable_reason("sdpa", "cpu", torch.float64, 7) is None
        assert "unknown backend" in unavailable_reason("xformers", "cpu", torch.float32, 64)

    def test_grad_constraint_is_checked_before_running(self, monkeypatch):
        calls = []
        flex = attention_backends.get_backend("flex")
        monkeypatch.setitem(attention_backends._REGISTRY, "flex",
                            dataclasses.replace(flex, run=lambda *a: calls.append(1) or flex.run(*a)))  # fmt: skip
        q, k, v, cq, ck, mq, mk = make_varlen_inputs([3], [3], heads=1, head_dim=16)
        with pytest.raises(RuntimeError, match=r"cannot differentiate on CPU .*use backend='cpu' or 'sdpa'"):
            uniref.varlen_attention(q.requires_grad_(), k, v, cq, ck, mq, mk, backend="flex")
        assert not calls


def test_old_import_path_is_deprecated_but_works():
    import uniref.attention
    import uniref.ops.attention as old

    for name in ("BACKENDS", "CUDA_HEAD_DIMS", "ENV_BACKEND", "auto_backend", "available_backends",
                 "unavailable_reason"):  # fmt: skip
        with pytest.warns(DeprecationWarning, match=f"uniref.ops.attention.{name} moved to uniref.attention"):
            assert getattr(old, name) is getattr(uniref.attention, name)
    q, k, v, cq, ck, mq, mk = make_varlen_inputs([3, 2], [1, 4], heads=1, head_dim=8)
    with pytest.warns(DeprecationWarning, match="run_backend"):
        out, _ = old.run_backend("cpu", q, k, v, cq, ck, mq, mk, 0.5, False)
    torch.testing.assert_close(out, uniref.varlen_attention(q, k, v, cq, ck, mq, mk, 0.5, backend="cpu"))
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        old.nothing
