"""GPU check of varlen attention: correctness on the card, then forward and forward + backward TFLOP/s of
our CUDA kernel and every peer present, for the packed SELF batches of docs/gpu_anchors.md
(bf16, 24 heads x 128): B1024 = 4 samples of 8448 / 6344 / 7468 / 6580 tokens, B2048 = 20736 / 13532;
then two batches of many shorter samples, where one SDPA call per sample pays its launches many times
(B512x16: 16 samples of 1500-2300 tokens; B256x64: 64 samples of 350-650), which place the crossover
that `backend="auto"` follows.
Usage: python benchmarks/gpu/attention.py [--smoke] [--batches B1024,B2048,...]

Correctness, before any timing, per backend that runs here:
* the batch scaled down 8x, forward and backward against the float64 per-sample reference, judged as
  flash-attention judges: max error at most 2x (forward) / 3x (backward) that of per-sample SDPA in bf16;
* the full batch, forward, on 64 query rows of every sample (a full float64 reference would not fit).
Timing: median of triton.testing.do_bench; TFLOP/s count useful work only, 4 * sum(L^2) * H * D forward
and 3.5x that forward + backward, as the anchors do. Methods: ours (backend "cuda"), backend "auto",
per-sample SDPA, padded SDPA + key mask, torch.nn.attention.varlen.varlen_attn, FlexAttention compiled
(document mask) and flash-attn when installed.

--smoke runs the same code at tiny shapes on the device at hand (CPU here: our C++ kernel stands in for
"ours"), so the script stays runnable between GPU sessions (tests/test_gpu_scripts.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # attention_peers.py

import uniref  # noqa: E402
from uniref.attention import auto_backend, available_backends, unavailable_reason  # noqa: E402
from uniref.attention_backends import mean_tokens_per_sample  # noqa: E402
from uniref.testing.attention import make_varlen_inputs, varlen_attention_reference  # noqa: E402

from attention_peers import attention_flops, fwd_bwd_step, padded_sdpa_attention  # noqa: E402
from common import bench_ms, card_header  # noqa: E402

ON_CUDA = torch.cuda.is_available()
BATCHES = {
    "B1024": (8448, 6344, 7468, 6580),
    "B2048": (20736, 13532),
    "B512x16": tuple(1500 + (797 * i) % 801 for i in range(16)),
    "B256x64": tuple(350 + (293 * i) % 301 for i in range(64)),
}
HEADS, HEAD_DIM, DTYPE = 24, 128, torch.bfloat16
OURS = "cuda" if ON_CUDA else "cpu"


def backend_method(backend):
    def run(q, k, v, cq, ck, mq, mk):
        return uniref.varlen_attention(q, k, v, cq, ck, mq, mk, backend=backend)

    device = "cuda" if ON_CUDA else "cpu"
    return run, None if backend == "auto" else unavailable_reason(backend, device, DTYPE, HEAD_DIM)


def auto_label(batch) -> str:
    """What ``backend="auto"`` picks for this batch, forward only and with gradients."""
    q, k, _, cq, *_ = batch
    tokens = mean_tokens_per_sample(q, k, cq)
    fwd, train = (auto_backend(q.device, DTYPE, HEAD_DIM, tokens, grad) for grad in (False, True))
    return f"uniref auto (= {fwd})" if fwd == train else f"uniref auto (= {fwd} fwd, {train} fwd+bwd)"


def torch_varlen_method():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        return None, f"torch {torch.__version__} has no varlen_attn ({exc})"

    def run(q, k, v, cq, ck, mq, mk):
        return varlen_attn(q, k, v, cq, ck, mq, mk)

    return run, None if ON_CUDA else "varlen_attn runs on CUDA only"


def padded_method():
    return (lambda q, k, v, cq, ck, mq, mk: padded_sdpa_attention(q, k, v, cq, ck)), None


def methods(batch) -> dict:
    """name -> (fn(q, k, v, cq, ck, mq, mk) -> out, reason it cannot run here or None)."""
    return {
        f"uniref ({OURS})": backend_method(OURS),
        auto_label(batch): backend_method("auto"),
        "SDPA per sample": backend_method("sdpa"),
        "SDPA padded + key mask": padded_method(),
        "torch varlen_attn": torch_varlen_method(),
        "FlexAttention (compiled)": backend_method("flex"),
        "flash-attn": backend_method("flash_attn"),
    }


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def outputs_and_grads(fn, batch, grad):
    q, k, v, *rest = batch
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, *rest)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


def check_scaled(name, fn, lengths, heads, device, needs_grad) -> str:
    """Forward (+ backward) at 1/8 of the batch vs float64, within 2x (3x) of per-sample SDPA's error."""
    batch = make_varlen_inputs(lengths, heads=heads, head_dim=HEAD_DIM, dtype=DTYPE, device=device, seed=1)
    q, k, v, cq, ck, *_ = batch
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=DTYPE)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = varlen_attention_reference(*leaves, cq, ck)[0]
    ref.backward(grad.double())
    ref = [ref.detach()] + [t.grad for t in leaves]
    sdpa = outputs_and_grads(backend_method("sdpa")[0], batch, grad)
    if needs_grad:
        got = outputs_and_grads(fn, batch, grad)
    else:
        with torch.no_grad():
            got = [fn(*batch)]
    parts = []
    for label, g, s, r, factor in zip(("out", "dq", "dk", "dv"), got, sdpa, ref, (2, 3, 3, 3)):
        err, budget = max_err(g, r), factor * max_err(s, r)
        assert torch.isfinite(g).all() and err <= budget, f"{name}: {label} error {err:.2e} > {factor}x SDPA's"
        parts.append(f"{label} {err:.1e} (SDPA {max_err(s, r):.1e})")
    return ", ".join(parts)


def check_rows(fn, batch, rows=64) -> float:
    """Full-size forward on `rows` query rows of every sample vs float64: the max abs error."""
    q, k, v, cq, ck, *_ = batch
    with torch.no_grad():
        out = fn(*batch)
    worst, offsets = 0.0, cq.tolist()
    for b in range(len(offsets) - 1):
        take = torch.linspace(offsets[b], offsets[b + 1] - 1, rows, device=q.device).long().unique()
        ks, vs = (t[offsets[b] : offsets[b + 1]].double().transpose(0, 1) for t in (k, v))
        scores = q[take].double().transpose(0, 1) @ ks.transpose(1, 2) * HEAD_DIM**-0.5
        ref = (torch.softmax(scores, dim=-1) @ vs).transpose(0, 1)
        worst = max(worst, max_err(out[take], ref))
    return worst


def time_method(fn, batch, backward: bool) -> float:
    q, k, v, *rest = batch
    if not backward:
        with torch.no_grad():
            fn(*batch)  # warm-up (compiles)
            return bench_ms(lambda: fn(*batch))
    step, _, _ = fwd_bwd_step(fn, q, k, v, *rest)
    step()
    return bench_ms(step)


def row(cells) -> None:
    """Prints one table row at once (a run cut short by its time limit keeps the rows it finished)."""
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the available device")
    parser.add_argument("--batches", default=",".join(BATCHES), help="comma-separated subset of " + ", ".join(BATCHES))
    args = parser.parse_args(argv)
    device = "cuda" if ON_CUDA else "cpu"
    # Smoke: lengths / 128 and 4 heads (PyTorch's CPU SDPA backward is slow at small lengths).
    scale, heads = (128, 4) if args.smoke else (1, HEADS)
    shape_note = f"bf16, {heads} heads x {HEAD_DIM}{', smoke: lengths / 128' if args.smoke else ''}"
    print(card_header(f"Varlen attention over packed SELF batches ({shape_note})"))
    print(f"backends available here: {available_backends(device, DTYPE, HEAD_DIM)}\n")
    row(["batch", "method", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s", "correct"])
    row(["---"] * 7)
    failures = []
    for batch_name in args.batches.split(","):
        full_lengths = BATCHES[batch_name]
        lengths = [max(1, n // scale) for n in full_lengths]
        batch = make_varlen_inputs(lengths, heads=heads, head_dim=HEAD_DIM, dtype=DTYPE, device=device)
        flops = attention_flops(lengths, lengths, heads, HEAD_DIM)
        for name, (fn, reason) in methods(batch).items():
            if reason is not None:
                row([batch_name, name, f"n/a: {reason}", "", "", "", ""])
                continue
            # Gradients where the method has them: FlexAttention on CPU runs only forward.
            needs_grad = not (name.startswith("Flex") and not ON_CUDA)
            small = [max(1, n // 8) for n in lengths]
            try:
                # A wrong result is reported in its row and fails the run at the end, after the timings.
                try:
                    verdict = check_scaled(name, fn, small, heads, device, needs_grad)
                    verdict += f"; full size, 64 rows per sample: out {check_rows(fn, batch):.1e}"
                    ok = "yes"
                except AssertionError as exc:
                    verdict, ok = f"FAILED: {exc}", "NO"
                    failures.append(f"{batch_name}, {name}: {exc}")
                print(f"  {batch_name} / 8, {name}: max abs error vs float64: {verdict}", flush=True)
                fwd = time_method(fn, batch, backward=False)
                both = time_method(fn, batch, backward=True) if needs_grad else None
            except torch.OutOfMemoryError:
                row([batch_name, name, "out of memory", "", "", "", ""])
                torch.cuda.empty_cache()
                continue
            both_cells = [f"{both:.3f}", f"{3.5 * flops / both / 1e9:.3g}"] if both else ["n/a: no backward here", ""]
            row([batch_name, name, f"{fwd:.3f}", f"{flops / fwd / 1e9:.3g}", *both_cells, ok])
        del batch
        if ON_CUDA:
            torch.cuda.empty_cache()
    if failures:
        raise SystemExit("wrong results:\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
