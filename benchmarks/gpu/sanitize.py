"""Small forward + backward calls of the CUDA varlen attention kernels, for compute-sanitizer (memcheck,
racecheck, synccheck) on a lent GPU; benchmarks/gpu/run.sh runs it under each tool, instrumenting only
uniref's attention kernels. Every head dim and dtype the kernels instantiate, on a batch with a
length-1 sample, an empty one, odd lengths and keys that outnumber queries (several tiles each way).
Each result is compared with the float64 reference, so a run that the tool slows down still checks values.
Usage: python benchmarks/gpu/sanitize.py [--smoke]   (--smoke: CPU, our C++ kernel stands in)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py

import uniref  # noqa: E402
from uniref.attention import CUDA_DTYPES, CUDA_HEAD_DIMS  # noqa: E402
from uniref.testing.attention import make_varlen_inputs, varlen_attention_reference  # noqa: E402

from common import card_header  # noqa: E402

Q_LENS, K_LENS = [1, 0, 133, 70], [3, 5, 200, 1]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="run on the CPU kernel (no GPU here)")
    args = parser.parse_args(argv)
    device, backend = ("cpu", "cpu") if args.smoke or not torch.cuda.is_available() else ("cuda", "cuda")
    print(card_header("varlen attention kernels for compute-sanitizer"))
    worst = {}
    for dtype in CUDA_DTYPES:
        for head_dim in CUDA_HEAD_DIMS:
            q, k, v, cq, ck, mq, mk = make_varlen_inputs(Q_LENS, K_LENS, heads=2, head_dim=head_dim, dtype=dtype,
                                                         device=device, seed=head_dim)  # fmt: skip
            leaves = [t.requires_grad_() for t in (q, k, v)]
            out = uniref.varlen_attention(*leaves, cq, ck, mq, mk, backend=backend)
            grad = torch.randn_like(out)
            grads = torch.autograd.grad(out, leaves, grad)
            ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
            ref = varlen_attention_reference(*ref_leaves, cq, ck)[0]
            ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
            errs = [
                ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
                for a, b in zip((out, *grads), (ref, *ref_grads))
            ]
            worst[(str(dtype).split(".")[-1], head_dim)] = max(errs)
    if device == "cuda":
        torch.cuda.synchronize()
    for (dtype, head_dim), err in worst.items():
        print(f"{dtype} d={head_dim}: max error / max |value| of out/dq/dk/dv vs float64 {err:.1e}")
    bad = {key: err for key, err in worst.items() if not err < 0.03}  # also catches NaN
    if bad:
        raise SystemExit(f"errors far beyond rounding: {bad}")


if __name__ == "__main__":
    main()
