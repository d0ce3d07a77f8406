"""A frozen base in 8-bit float for LoRA training: every Linear's weight stored as ``float8_e4m3fn`` with one
scale per output channel (1 byte per parameter instead of 2), dequantized to the input's dtype at each call.

Per output channel ``o``: ``scale[o] = max|W[o, :]| / 448`` (448: the largest e4m3 value), ``W8 = W / scale``
rounded to e4m3; the layer computes ``x @ (W8 * scale).T + b``. The adapters (PEFT LoRA) wrap these layers as
they wrap `nn.Linear`, and train in the input's dtype; only the frozen base is 8-bit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Float8Linear", "dequantize_linears", "quantize_linears"]

_E4M3_MAX = 448.0


class Float8Linear(nn.Linear):
    """`nn.Linear` whose frozen weight is ``float8_e4m3fn`` with a per-output-channel ``weight_scale``.

    ``compute_dtype``: the adapters' dtype. PEFT puts a wrapped layer's adapters in its ``compute_dtype`` when
    it has one (as for bitsandbytes' 4-bit layers), else in its weight's dtype, which here is 8-bit."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> "Float8Linear":
        w = linear.weight.detach().float()
        if not torch.isfinite(w).all():
            raise ValueError(
                f"a Linear({linear.in_features}, {linear.out_features}) has non-finite weights: 8-bit "
                "storage would hide them; fix the checkpoint first"
            )
        scale = (w.abs().amax(dim=1) / _E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.in_features, out.out_features = linear.in_features, linear.out_features
        out.weight = nn.Parameter((w / scale[:, None]).to(torch.float8_e4m3fn), requires_grad=False)
        out.compute_dtype = compute_dtype or linear.weight.dtype
        out.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        out.register_buffer("weight_scale", scale)
        return out

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        return self.weight.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), bias)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype)
        with torch.no_grad():
            out.weight.copy_(self.dequantized_weight(dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out.requires_grad_(False)


def _swap(module: nn.Module, make) -> int:
    count = 0
    for name, child in list(module.named_children()):
        replacement = make(child)
        if replacement is not None:
            setattr(module, name, replacement)
            count += 1
        else:
            count += _swap(child, make)
    return count


def quantize_linears(module: nn.Module, compute_dtype: torch.dtype | None = None) -> int:
    """Replaces every `nn.Linear` in ``module`` by a `Float8Linear` (in place); returns how many."""
    return _swap(module, lambda m: Float8Linear.from_linear(m, compute_dtype) if type(m) is nn.Linear else None)


def dequantize_linears(module: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Puts plain `nn.Linear` layers (dequantized to ``dtype``) back in place of `Float8Linear` ones."""
    return _swap(module, lambda m: m.to_linear(dtype) if isinstance(m, Float8Linear) else None)
