"""uniref.models.float8: a frozen 8-bit base for LoRA training, against the bf16 model on the CPU."""

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

import uniref
from uniref.models.float8 import Float8Linear, dequantize_linears, quantize_linears
from uniref.models.transformer import UniRefTransformer2DModel
from uniref.testing.qwen import TINY_TRANSFORMER

TINY = {**TINY_TRANSFORMER, **{"joint_attention_dim": 32, "attention_head_dim": 32, "axes_dims_rope": (8, 12, 12)}}


def _forward(model, dtype):
    g = torch.Generator().manual_seed(0)
    tokens, layout = uniref.pack_latents([[torch.randn(4, 8, 8, generator=g), torch.randn(4, 4, 6, generator=g)]])
    text = torch.randn(7, 32, generator=g)
    with torch.no_grad():
        return model(tokens.to(dtype), text.to(dtype), torch.tensor([0.3], dtype=dtype), layout, [7]).float()


def test_a_float8_base_stays_close_to_the_bf16_model():
    torch.manual_seed(0)
    model = UniRefTransformer2DModel(**TINY, attention_backend="cpu").eval()
    reference = _forward(model.double(), torch.float64)
    bf16 = _forward(copy.deepcopy(model).to(torch.bfloat16), torch.bfloat16)
    fp8 = copy.deepcopy(model).to(torch.bfloat16)
    n = quantize_linears(fp8)
    assert n == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    linears = [m for m in fp8.modules() if isinstance(m, Float8Linear)]
    assert all(m.weight.dtype == torch.float8_e4m3fn and m.weight.element_size() == 1 for m in linears)
    out = _forward(fp8, torch.bfloat16)
    err = lambda x: ((x - reference).norm() / reference.norm()).item()  # noqa: E731
    # measured here: bf16 1.0% relative error against float64, the 8-bit base 3.2% (e4m3 keeps 3 mantissa bits)
    assert err(bf16) < 0.02 and err(out) < 0.06, (err(bf16), err(out))
    plain = copy.deepcopy(fp8)
    assert dequantize_linears(plain, torch.bfloat16) == n
    assert torch.equal(_forward(plain, torch.bfloat16), out)  # dequantizing changes nothing


def test_adapters_on_a_float8_base_train_in_the_compute_dtype():
    layer = torch.nn.Sequential(torch.nn.Linear(8, 16))
    quantize_linears(layer, compute_dtype=torch.float32)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), layer)
    dtypes = {n: p.dtype for n, p in layer.named_parameters()}
    assert dtypes["0.base_layer.weight"] == torch.float8_e4m3fn
    assert dtypes["0.lora_A.default.weight"] == dtypes["0.lora_B.default.weight"] == torch.float32
    x = torch.randn(3, 8)
    layer(x).square().sum().backward()
    assert layer[0].lora_A["default"].weight.grad is not None and layer[0].base_layer.weight.grad is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(bad):
    linear = torch.nn.Linear(4, 4)
    with torch.no_grad():
        linear.weight[1, 2] = bad
    with pytest.raises(ValueError, match="non-finite"):
        Float8Linear.from_linear(linear)
