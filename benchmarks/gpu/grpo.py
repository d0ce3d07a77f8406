"""GPU check of the MSGRPO Triton kernels: correctness vs the torch reference on the card, then wall-clock
per call (forward + backward of the Flow-GRPO loss, 24 samples x 4096 tokens x 64 channels, with the KL
term) for our kernels, eager PyTorch and torch.compile, as GB/s of the minimum traffic vs the card's
measured copy bandwidth. Usage: python benchmarks/gpu/grpo.py [--smoke]

--smoke runs the same checks at tiny shapes on the device at hand; without CUDA that is CPU tensors under
the Triton interpreter (TRITON_INTERPRET=1, set here if the caller did not), which keeps the script and
the kernels' correctness checks working between GPU sessions.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the shared batches

from test_grpo import advantage_batch, advantages_numpy_loop, loss_batch  # noqa: E402

import uniref.grpo as grpo  # noqa: E402
from uniref.kernels import grpo as kernels  # noqa: E402
from uniref.testing.grpo import flow_grpo_loss_reference, group_advantages_reference  # noqa: E402

from common import bench_ms, card_header, copy_bandwidth_gbs  # noqa: E402

CLIP, BETA = 1e-4, 0.04
ON_CUDA = torch.cuda.is_available()


def uniref_step(b, mean):
    """Ours, forward + backward. On CUDA the public function (op dispatch -> Triton, autograd); on CPU
    the same kernels through their launchers (the CPU op is the torch reference itself)."""
    if ON_CUDA:
        loss, stats = grpo.flow_grpo_loss(b["x_next"], mean, b["old_log_prob"], b["advantages"], b["step_std"], CLIP,
                                          b["mean_ref"], BETA)  # fmt: skip
        loss.backward()
        return loss, stats["ratio"], mean.grad
    out = kernels.flow_grpo_loss_forward(b["x_next"], mean.detach(), b["mean_ref"], b["old_log_prob"], b["advantages"],
                                         b["step_std"], b["step_std"], CLIP, BETA, True)  # fmt: skip
    one = torch.ones((), device=mean.device)
    grad = kernels.flow_grpo_loss_backward(one, b["x_next"], mean.detach(), b["mean_ref"], out[5])
    return out[0], out[2], grad


def _reference(b, mean):
    return flow_grpo_loss_reference(b["x_next"], mean, b["old_log_prob"], b["advantages"], b["step_std"], CLIP,
                                    b["mean_ref"], BETA)  # fmt: skip


def eager_step(b, mean):
    loss, stats = _reference(b, mean)
    loss.backward()
    return loss, stats["ratio"], mean.grad


_compiled = torch.compile(_reference)


def compile_step(b, mean):
    loss, stats = _compiled(b, mean)
    loss.backward()
    return loss, stats["ratio"], mean.grad


def check_loss(b, dtype) -> str:
    """Ours vs the float64 reference on the same values; returns the worst relative errors."""
    mean = b["mean"].clone().requires_grad_()
    loss, ratio, grad = uniref_step(b, mean)
    up = {k: v.double() for k, v in b.items()}
    m64 = up["mean"].clone().requires_grad_()
    exp_loss, exp_stats = flow_grpo_loss_reference(up["x_next"], m64, up["old_log_prob"], up["advantages"],
                                                   up["step_std"], CLIP, up["mean_ref"], BETA)  # fmt: skip
    exp_loss.backward()
    loss_err = abs(loss.item() - exp_loss.item()) / max(abs(exp_loss.item()), 1e-12)
    ratio_err = ((ratio.double() - exp_stats["ratio"]).abs().max()).item()
    grad_err = ((grad.double() - m64.grad).abs().max() / m64.grad.abs().max()).item()
    grad_tol = 1e-2 if dtype != torch.float32 else 1e-4
    assert loss_err < 1e-4 and ratio_err < 1e-5 and grad_err < grad_tol, (loss_err, ratio_err, grad_err)
    return f"loss {loss_err:.1e}, ratio {ratio_err:.1e}, grad {grad_err:.1e} (relative to max |grad|)"


def check_advantages(device, prompts, group) -> str:
    rewards, ids, weights = (t.to(device) for t in advantage_batch(prompts, group))
    for normalize_first in (False, True):
        for batch_std in (False, True):
            adv, constant = kernels.group_advantages(rewards, ids, weights, normalize_first, batch_std, 1e-4, 5.0)
            exp, exp_constant = group_advantages_reference(rewards.double(), ids, weights.double(), normalize_first,
                                                           batch_std, 1e-4, 5.0)  # fmt: skip
            err = (adv.double() - exp).abs().max().item()
            assert err < 1e-4 and torch.equal(constant, exp_constant), (normalize_first, batch_std, err)
    return "advantages: all 4 (aggregate, std) modes match"


def count_kernels(b) -> str:
    """CUDA kernels launched by one forward + backward of ours (the claim: 2 Triton + 1 counter fill)."""
    from torch.profiler import ProfilerActivity, profile

    mean = b["mean"].clone().requires_grad_()
    uniref_step(b, mean)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        mean.grad = None
        uniref_step(b, mean)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    return f"{len(names)} kernels per forward + backward: {', '.join(n[:40] for n in names)}"


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the available device")
    args = parser.parse_args(argv)
    device = "cuda" if ON_CUDA else "cpu"
    n, tokens, channels = (3, 40, 5) if args.smoke else (24, 4096, 64)
    prompts, group = (2, 5) if args.smoke else (16, 24)
    print(card_header(f"MSGRPO: Flow-GRPO loss forward + backward, {n} x {tokens} tokens x {channels} ch, with KL"))
    print("| dtype | method | ms / call | GB/s (min traffic) | copy GB/s | / copy | ours faster by |")
    print("|---|---|---|---|---|---|---|")
    notes = []
    for dtype in (torch.float32, torch.bfloat16):
        b = loss_batch(n, tokens, channels, dtype=dtype, device=device)
        notes.append(f"{str(dtype).split('.')[-1]}: {check_loss(b, dtype)}")
        numel, size = b["mean"].numel(), b["mean"].element_size()
        traffic = 4 * numel * size  # read x_next, mean, mean_ref once; write the gradient once
        copy = copy_bandwidth_gbs(numel * size, device)
        mean = b["mean"].clone().requires_grad_()
        times = {}
        steps = (("uniref (Triton)", uniref_step), ("torch eager", eager_step), ("torch.compile", compile_step))
        for name, step in steps:
            step(b, mean)  # warm-up (compiles)

            def call(step=step):
                mean.grad = None
                step(b, mean)

            times[name] = bench_ms(call)
        ours = times["uniref (Triton)"]
        for name, ms in times.items():
            gbs = traffic / ms / 1e6
            speedup = "" if name.startswith("uniref") else f"{ms / ours:.1f}x"
            row = [
                str(dtype).split(".")[-1],
                name,
                f"{ms:.4f}",
                f"{gbs:.0f}",
                f"{copy:.0f}",
                f"{gbs / copy:.2f}",
                speedup,
            ]
            print("| " + " | ".join(row) + " |")
    rewards, ids, weights = (t.to(device) for t in advantage_batch(prompts, group))
    adv_ours = bench_ms(lambda: kernels.group_advantages(rewards, ids, weights, False, False, 1e-4, 5.0))
    adv_ref = bench_ms(lambda: group_advantages_reference(rewards, ids, weights, False, False, 1e-4, 5.0))
    adv_np = bench_ms(lambda: advantages_numpy_loop(rewards.cpu(), ids.cpu(), weights.cpu()))
    print(f"\ngroup_advantages {rewards.shape[0]} x {rewards.shape[1]} sources: kernel {adv_ours:.4f} ms, "
          f"torch reference {adv_ref:.4f} ms, Flow-GRPO numpy loop {adv_np:.4f} ms")  # fmt: skip
    notes.append(check_advantages(device, prompts, group))
    if ON_CUDA:
        try:  # diagnostics only: a profiler hiccup must not hide the results above
            notes.append(count_kernels(loss_batch(n, tokens, channels, device=device)))
        except Exception as exc:  # noqa: BLE001
            notes.append(f"kernel count unavailable: {exc!r}")
    print("\ncorrectness on this device vs the float64 reference:")
    for line in notes:
        print(f"- {line}")


if __name__ == "__main__":
    main()
