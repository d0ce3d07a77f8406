"""MSGRPO math: the Flow-GRPO SDE step with log-probabilities, multi-source group advantages and the
clipped policy loss (formulas: `docs/flow_grpo.md`).

    x_next, mean, log_prob, step_std = sde_step_with_logprob(x_t, v, sigma, sigma_next, noise_level)
    advantages, stats = group_advantages(rewards, group_ids)             # once per rollout batch
    loss, stats = flow_grpo_loss(x_next, mean_theta, log_prob, advantages, step_std)   # per timestep

`group_advantages` and `flow_grpo_loss` run the `uniref::group_advantages` and `uniref::flow_grpo_loss`
ops: fused Triton kernels on CUDA (one launch for the advantages, one forward and one backward launch
for the loss plus a 4-byte counter fill, no host sync), fp32 torch references on CPU.
`sde_step_with_logprob` is plain torch (elementwise math that autograd differentiates through to the model's
velocity).
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from uniref import ops as _ops_module  # noqa: F401  (registers the ops)
from uniref.testing.grpo import compute_dtype, sde_step_reference

_ops = torch.ops.uniref

__all__ = ["flow_grpo_loss", "group_advantages", "sde_step_with_logprob"]

SdeKind = Literal["sde", "cps"]  # Flow-GRPO's SDE, or coefficients-preserving sampling
Aggregate = Literal["sum_then_normalize", "normalize_then_sum"]  # how reward sources become one advantage
AdvStd = Literal["group", "batch"]  # whose std normalizes the advantages
_KINDS, _AGGREGATES, _STDS = SdeKind.__args__, Aggregate.__args__, AdvStd.__args__
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- argument checks (shapes, dtypes and devices only: no device data is read) -------------------------


def _check_batch_tensor(fn: str, name: str, t, like: Tensor | None = None) -> None:
    """`t` is a float tensor (N, ...) with N >= 1 and, if `like` is given, like's shape and device."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{fn}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if like is None:
        if t.dim() == 0 or t.shape[0] == 0:
            raise ValueError(f"{fn}: {name} must be (N, ...) with N >= 1 samples, got shape {tuple(t.shape)}")
        return
    if t.shape != like.shape:
        raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)} but must match {tuple(like.shape)}")
    if t.device != like.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but the batch is on {like.device}; move it there")


def _check_per_sample(fn: str, name: str, t, n: int, device: torch.device) -> None:
    """`t` is a float tensor of shape (N,) on `device`."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor of shape ({n},), got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{fn}: {name} must be a float tensor, got {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"{fn}: {name} must have shape ({n},) (one value per sample), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device} but the batch is on {device}; move it there")


def _check_real(fn: str, name: str, value, low: float, *, strict: bool = False, finite: bool = True) -> float:
    """A Python real number >= low (> low when strict), finite unless finite=False."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a Python number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)) or value < low or (strict and value == low):
        bound = f"> {low}" if strict else f">= {low}"
        raise ValueError(f"{fn}: {name} must be a {'finite ' if finite else ''}number {bound}, got {value}")
    return value


# ---- SDE step ---------------------------------------------------------------------------------------------


def _per_sample_value(name: str, value, n: int, like: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A Python number or a () / (N,) tensor -> (the value to check, the value to compute with).

    A number is checked as a 0-d CPU tensor (no device sync; torch mixes 0-d CPU tensors with device
    ones) rounded to the compute dtype exactly like the device copy, which `torch.full` makes without a
    host-to-device transfer.
    """
    fn = "sde_step_with_logprob"
    if isinstance(value, Tensor):
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != n):
            raise ValueError(f"{fn}: {name} must be a number, a 0-d tensor or shape ({n},), got {tuple(value.shape)}")
        if value.dtype not in _FLOATS:
            raise TypeError(f"{fn}: {name} must be a float tensor, got {value.dtype}")
        if value.device != like.device:
            raise ValueError(f"{fn}: {name} is on {value.device} but x_t is on {like.device}; move it there")
        return value, value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a number or a tensor, got {type(value).__name__}")
    return torch.tensor(float(value), dtype=dtype), torch.full((), float(value), dtype=dtype, device=like.device)


def sde_step_with_logprob(
    x_t: Tensor,
    velocity: Tensor,
    sigma,
    sigma_next,
    noise_level,
    kind: str = "sde",
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    prev_sample: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One stochastic flow-matching step from sigma to sigma_next, with the log-probability of its result.

    Conventions (Flow-GRPO): sigmas run from 1 (noise) to 0 (data), x_t = (1 - s) x_0 + s eps, the model
    predicts v ~ eps - x_0, dt = sigma_next - sigma < 0 and a = noise_level.

    kind="sde": std_t = a sqrt(s / (1 - s)) (at s = 1 the denominator uses sigma_next, the first sigma
    below 1, as Flow-GRPO does), mean = x_t (1 + std_t^2 dt / (2 s)) + v (1 + std_t^2 (1 - s) / (2 s)) dt,
    step_std = std_t sqrt(-dt), log_prob = mean over elements of the Gaussian log-density.
    kind="cps" (coefficients-preserving): step_std = s' sin(a pi / 2), mean = (1 - s') (x_t - s v) +
    sqrt(s'^2 - step_std^2) (x_t + (1 - s) v), log_prob = -mean((x_next - mean)^2) (constants dropped).
    In both, x_next = mean + step_std * noise.

    Args:
        x_t: (N, ...) float tensor with at least one element per sample, the current latents (any float
            dtype; math in fp32).
        velocity: (N, ...) like x_t, the model's prediction. Gradients flow to it (and x_t) through `mean`.
        sigma: number, 0-d or (N,) tensor, 0 < sigma <= 1.
        sigma_next: number, 0-d or (N,) tensor, 0 <= sigma_next < sigma.
        noise_level: number, 0-d or (N,) tensor, a > 0 (0.7-1.5 in public Flow-GRPO configs); with "cps",
            0 < a <= 1 (step_std = sigma_next sin(a pi / 2) reaches sigma_next at a = 1; larger a only repeat
            those stds, and from a = 2 they are <= 0).
        kind: "sde" or "cps".
        noise: (N, ...) standard normal noise; drawn with `generator` when None.
        generator: torch.Generator for drawing the noise.
        prev_sample: (N, ...) used as x_next (re-scoring a stored rollout); excludes noise and generator.

    Returns:
        x_next, mean: (N, ...) float32 (float64 if an input is float64): x_next is returned at full
            precision so that re-scoring it reproduces `log_prob` exactly (a bf16 copy would shift the
            ratio by far more than Flow-GRPO's clip range of 1e-4).
        log_prob: (N,) the per-sample MEAN (not sum) over all non-batch elements, computed in fp32.
        step_std: (N,) the std of the step's Gaussian (std_t sqrt(-dt) for "sde").

    Raises:
        TypeError / ValueError naming the argument: bad shapes, dtypes, devices, unknown kind, samples
        with no elements, sigmas outside 0 <= sigma_next < sigma <= 1, noise_level <= 0 (or > 1 with
        "cps"), conflicting noise arguments, and a "sde" step whose step_std is so small that its square
        underflows the compute dtype (e.g. sigma or noise_level 1e-30 in fp32: the Gaussian log-density
        would be 0 / 0). Number-valued arguments are checked on the host without a device sync; device
        tensors cost one sync (skipped under torch.compile).
    """
    fn = "sde_step_with_logprob"
    if kind not in _KINDS:
        raise ValueError(f"{fn}: kind must be one of {_KINDS}, got {kind!r}")
    _check_batch_tensor(fn, "x_t", x_t)
    _check_batch_tensor(fn, "velocity", velocity, like=x_t)
    if prev_sample is not None:
        if noise is not None or generator is not None:
            raise ValueError(f"{fn}: prev_sample is used as x_next, so noise and generator must be None")
        _check_batch_tensor(fn, "prev_sample", prev_sample, like=x_t)
    if noise is not None:
        if generator is not None:
            raise ValueError(f"{fn}: generator only draws noise when noise is None; pass one or the other")
        _check_batch_tensor(fn, "noise", noise, like=x_t)
    n = x_t.shape[0]
    if x_t[0].numel() == 0:
        raise ValueError(
            f"{fn}: x_t has no elements per sample (shape {tuple(x_t.shape)}); log_prob is a mean over them"
        )
    dtype = compute_dtype(x_t, velocity)
    (s, sigma), (s_next, sigma_next), (a, noise_level) = (
        _per_sample_value(name, value, n, x_t, dtype)
        for name, value in (("sigma", sigma), ("sigma_next", sigma_next), ("noise_level", noise_level))
    )
    if not torch.compiler.is_compiling():
        if not bool(((s > 0) & (s <= 1)).all()):
            raise ValueError(f"{fn}: sigma must be in (0, 1] (1 = pure noise, 0 = data), got {s.tolist()}")
        if not bool(((s_next >= 0) & (s_next < s)).all()):
            raise ValueError(
                f"{fn}: sigma_next must satisfy 0 <= sigma_next < sigma (a step goes toward the data), "
                f"got sigma={s.tolist()}, sigma_next={s_next.tolist()}"
            )
        if not bool(((a > 0) & torch.isfinite(a)).all()):
            raise ValueError(f"{fn}: noise_level must be finite and > 0, got {a.tolist()}")
        if kind == "cps" and not bool((a <= 1).all()):
            raise ValueError(
                f"{fn}: kind='cps' needs 0 < noise_level <= 1 (step_std = sigma_next * sin(noise_level * pi / 2) "
                f"peaks at 1 and is <= 0 from 2), got {a.tolist()}"
            )
        if kind == "sde":
            _check_step_std(s, s_next, a, dtype)
    if prev_sample is None and noise is None:
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=dtype)
    return sde_step_reference(x_t, velocity, sigma, sigma_next, noise_level, kind, noise, prev_sample)


def _check_step_std(s: Tensor, s_next: Tensor, a: Tensor, dtype: torch.dtype) -> None:
    """Refuses an "sde" step whose std squared is below the smallest normal number of ``dtype``.

    The log-density divides by step_std^2: once that underflows, log_prob is 0 / 0 = NaN, and just above it
    is rounded to a few bits. The std is computed by the reference itself on the host copies of the step's
    numbers (one element per sample, no device data for number-valued arguments).
    """
    probe = torch.zeros(max(s.numel(), s_next.numel(), a.numel()), 1, dtype=dtype, device=s.device)
    step_std = sde_step_reference(probe, probe, s, s_next, a, "sde", probe)[3]
    smallest = math.sqrt(torch.finfo(dtype).tiny)
    if not bool((step_std >= smallest).all()):
        raise ValueError(
            f"sde_step_with_logprob: sigma={s.tolist()}, sigma_next={s_next.tolist()}, noise_level={a.tolist()} "
            f"give step_std {step_std.tolist()}, below {smallest:.3g}, the smallest whose square {dtype} holds; "
            "the log-probability would be NaN: use a larger sigma or noise_level (or float64 inputs)"
        )


# ---- advantages -----------------------------------------------------------------------------------------


def _advantage_inputs(rewards, group_ids, weights, aggregate, std, eps, clip):
    """Validates the local arguments; returns rewards (N, S) float, group_ids (N,) int64, weights (S,)."""
    fn = "group_advantages"
    if aggregate not in _AGGREGATES:
        raise ValueError(f"{fn}: aggregate must be one of {_AGGREGATES}, got {aggregate!r}")
    if std not in _STDS:
        raise ValueError(f"{fn}: std must be 'group' (each group's std) or 'batch' (the whole batch's), got {std!r}")
    _check_real(fn, "eps", eps, 0.0)
    _check_real(fn, "clip", clip, 0.0, strict=True, finite=False)
    if not isinstance(rewards, Tensor):
        raise TypeError(f"{fn}: rewards must be a torch.Tensor of shape (N,) or (N, S), got {type(rewards).__name__}")
    if rewards.dim() not in (1, 2) or rewards.shape[0] == 0 or (rewards.dim() == 2 and rewards.shape[1] == 0):
        raise ValueError(
            f"{fn}: rewards must be (N,) or (N, S) with N >= 1 samples and S >= 1 sources, got {tuple(rewards.shape)}"
        )
    if rewards.is_complex():
        raise TypeError(f"{fn}: rewards must be real, got {rewards.dtype}")
    if rewards.dtype not in _FLOATS:
        rewards = rewards.to(torch.float32)
    rewards = rewards.reshape(rewards.shape[0], -1)
    n, s = rewards.shape
    if not isinstance(group_ids, Tensor):
        raise TypeError(
            f"{fn}: group_ids must be an integer torch.Tensor of shape ({n},), got {type(group_ids).__name__}"
        )
    if group_ids.dtype.is_floating_point or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise TypeError(f"{fn}: group_ids must hold integer keys (e.g. a prompt index), got {group_ids.dtype}")
    if group_ids.shape != (n,):
        raise ValueError(
            f"{fn}: group_ids must have shape ({n},) (one key per reward row), got {tuple(group_ids.shape)}"
        )
    if group_ids.device != rewards.device:
        raise ValueError(f"{fn}: group_ids is on {group_ids.device} but rewards are on {rewards.device}")
    wdtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    if weights is None:
        weights = torch.ones(s, dtype=wdtype, device=rewards.device)
    elif isinstance(weights, Tensor):
        if weights.dtype not in _FLOATS:
            weights = weights.to(wdtype)
        weights = weights.to(rewards.device)
    else:
        weights = torch.tensor([float(w) for w in weights], dtype=wdtype, device=rewards.device)
    if weights.shape != (s,):
        raise ValueError(
            f"{fn}: weights must have one entry per reward source, shape ({s},), got {tuple(weights.shape)}"
        )
    if not bool(torch.isfinite(weights).all()):
        raise ValueError(f"{fn}: weights must be finite, got {weights.tolist()}")
    return rewards, group_ids.to(torch.int64), weights


def _collective_device() -> torch.device:
    """NCCL exchanges CUDA tensors; gloo (and the rest) host tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _gather_batch(local, error: Exception | None, settings: list[float]):
    """All-gathers (rewards, group_ids) over the default process group, in rank order.

    Every rank takes part even when its own input is invalid, then all ranks raise together: a rank that
    raised before the collective would leave the others waiting in it forever. `settings` (the options
    and weights as numbers) must agree across ranks, or the ranks would compute different advantages.
    Returns (rewards (N_total, S), group_ids (N_total,), offset of this rank's rows).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    rewards, group_ids, _ = local if local is not None else (None, None, None)
    device = _collective_device()
    n, s = rewards.shape if local is not None else (0, 0)
    f64 = local is not None and rewards.dtype == torch.float64
    header = torch.tensor([n, s, error is None, f64], dtype=torch.int64, device=device)
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header)
    table = torch.stack(headers).cpu().tolist()
    if error is not None:
        raise error
    bad = [r for r, row in enumerate(table) if not row[2]]
    if bad:
        raise ValueError(f"group_advantages: rank(s) {bad} received invalid input (see the error raised there)")
    sources = sorted({row[1] for row in table})
    if len(sources) > 1:
        raise ValueError(f"group_advantages: every rank must pass the same number of reward sources, got {sources}")
    mine = torch.tensor(settings, dtype=torch.float64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    if not all(torch.equal(other, mine) for other in everyone):
        raise ValueError(
            "group_advantages: aggregate, std, eps, clip and weights must be the same on every rank, got "
            f"{[o.tolist() for o in everyone]} ([normalize_then_sum, batch std, eps, clip, weights...] per rank)"
        )
    sizes = [row[0] for row in table]
    longest = max(sizes)
    # Rewards travel as float64: exact for every input dtype.
    r_pad = torch.zeros(longest, s, dtype=torch.float64, device=device)
    r_pad[:n] = rewards.to(device=device, dtype=torch.float64)
    g_pad = torch.zeros(longest, dtype=torch.int64, device=device)
    g_pad[:n] = group_ids.to(device)
    r_all = [torch.empty_like(r_pad) for _ in range(world)]
    g_all = [torch.empty_like(g_pad) for _ in range(world)]
    dist.all_gather(r_all, r_pad)
    dist.all_gather(g_all, g_pad)
    dtype = torch.float64 if any(row[3] for row in table) else torch.float32
    r_cat = torch.cat([r[:k] for r, k in zip(r_all, sizes)]).to(device=rewards.device, dtype=dtype)
    g_cat = torch.cat([g[:k] for g, k in zip(g_all, sizes)]).to(rewards.device)
    return r_cat, g_cat, sum(sizes[:rank])


# Rewards whose weighted magnitude is outside [2^-40, 2^40] are rescaled before normalizing (see
# `_reward_scale`); inside it, squares and sums of fp32 rewards stay far from overflow and underflow.
_REWARD_RANGE = (2.0**-40, 2.0**40)


def _reward_scale(rewards: Tensor, weights: Tensor) -> float:
    """A power of two c with c * max|r| * sum|w| near 1, or 1 when the rewards are in `_REWARD_RANGE`.

    The advantages (r - mean) / (std + eps) do not change under r -> c r, eps -> c eps, and a power of two
    scales exactly; without it, fp32 rewards of magnitude 1e20 square to inf (every std inf, every
    advantage 0, yet no group counted as constant) and rewards of 1e-25 square to 0.
    """
    peak = float(rewards.abs().max()) * float(weights.abs().sum())
    if peak == 0 or _REWARD_RANGE[0] <= peak <= _REWARD_RANGE[1]:
        return 1.0
    return 2.0 ** -math.frexp(peak)[1]


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    weights=None,
    aggregate: str = "sum_then_normalize",
    std: str = "group",
    eps: float = 1e-4,
    clip: float = 5.0,
) -> tuple[Tensor, dict]:
    """Group-relative advantages (GRPO) over one or several reward sources.

    A group is the set of samples with the same key in `group_ids` (same prompt and same references).
    With "sum_then_normalize", r = sum_s w_s r_s and A_i = (r_i - mean_group(r)) / (std + eps); with
    "normalize_then_sum" (MixGRPO / GDPO), each source is normalized that way within its group and
    A_i = sum_s w_s A_i^(s) (rewards of any finite magnitude: far from 1, they are rescaled exactly by a
    power of two, with eps, before normalizing). `std` is the group's population std (ddof = 0, as
    Flow-GRPO's numpy) or, with std="batch", the whole batch's ("global std", Flow-GRPO's default); the
    mean is always the group's. A is then clipped to [-clip, clip]. A group whose normalized quantity holds
    one value (all rewards equal, groups of one sample included) contributes exactly 0, never NaN.

    When torch.distributed is initialized with more than one process, groups may span ranks: every rank
    all-gathers the batch's rewards and keys (tiny), computes the advantages of the whole batch and
    keeps its own rows, so each rank gets exactly what one process holding the whole batch would (in
    rank order). All ranks must call this together.

    Args:
        rewards: (N,) or (N, S) rewards of S sources; any real dtype (math in fp32, fp64 for fp64).
        group_ids: (N,) integer keys on the same device.
        weights: (S,) source weights (tensor or sequence); default all ones.
        aggregate: "sum_then_normalize" or "normalize_then_sum".
        std: "group" or "batch".
        eps: >= 0, added to the std.
        clip: > 0 (may be math.inf), the advantages' bound.

    Returns:
        advantages: (N,) float32 (float64 for float64 rewards or weights), this rank's rows.
        stats: dict over the whole batch (the same on all ranks):
            "zero_std_fraction" (): the fraction of groups whose advantages are all 0 because their
                rewards are all equal (with "normalize_then_sum": equal in every source);
            "zero_std_fraction_per_source" (S,): with "normalize_then_sum" only, the same per source;
            "source_mean", "source_std" (S,): each source's mean and population std over the batch;
            "num_groups": the number of groups (an int).

    Raises:
        TypeError / ValueError naming the argument: shapes, dtypes, devices, unknown options, negative
        eps, non-positive clip, non-finite weights, and non-finite rewards (with their count and the
        first offending row). Reads the rewards on the host (one sync): this runs once per rollout batch.
    """
    fn = "group_advantages"
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        try:
            local, error = _advantage_inputs(rewards, group_ids, weights, aggregate, std, eps, clip), None
            settings = [aggregate == "normalize_then_sum", std == "batch", eps, clip, *local[2].tolist()]
        except (TypeError, ValueError) as exc:
            local, error, settings = None, exc, []
        all_rewards, all_ids, offset = _gather_batch(local, error, settings)
        weights, n_local = local[2], local[0].shape[0]
    else:
        all_rewards, all_ids, weights = _advantage_inputs(rewards, group_ids, weights, aggregate, std, eps, clip)
        offset, n_local = 0, all_rewards.shape[0]
    finite = torch.isfinite(all_rewards).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        where = f" of the batch gathered over {dist.get_world_size()} ranks" if distributed else ""
        raise ValueError(
            f"{fn}: rewards hold non-finite values in {bad.numel()} row(s){where}, first at row {int(bad[0])}: "
            f"{all_rewards[bad[0]].tolist()}; a reward model returned NaN/inf, fix or drop those samples"
        )
    normalize_first = aggregate == "normalize_then_sum"
    scale = _reward_scale(all_rewards, weights)
    advantages, constant = _ops.group_advantages(
        all_rewards if scale == 1 else (all_rewards.double() * scale).to(all_rewards.dtype),
        all_ids,
        weights,
        normalize_first,
        std == "batch",
        float(eps) * scale,
        float(clip),
    )
    _, inverse, counts = torch.unique(all_ids, return_inverse=True, return_counts=True)
    num_groups = counts.numel()

    def group_fraction(flags: Tensor) -> Tensor:
        # Every row of a group carries the same flag: scatter any of them to the group.
        per_group = torch.zeros(num_groups, *flags.shape[1:], dtype=torch.bool, device=flags.device)
        return per_group.index_put_((inverse,), flags).to(advantages.dtype).mean(dim=0)

    stats = {
        "zero_std_fraction": group_fraction(constant.all(dim=1)),
        "source_mean": all_rewards.to(advantages.dtype).mean(dim=0),
        "source_std": all_rewards.to(advantages.dtype).std(dim=0, correction=0),
        "num_groups": num_groups,
    }
    if normalize_first:
        stats["zero_std_fraction_per_source"] = group_fraction(constant)
    return advantages[offset : offset + n_local], stats


# ---- loss --------------------------------------------------------------------------------------------------


def flow_grpo_loss(
    x_next: Tensor,
    mean: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    step_std: Tensor,
    clip_range: float = 1e-4,
    mean_ref: Tensor | None = None,
    beta: float = 0.0,
    kl_std: Tensor | None = None,
    kind: str = "sde",
) -> tuple[Tensor, dict]:
    """The Flow-GRPO clipped policy loss of one trained timestep, with an optional KL penalty.

        log_prob_n = mean over elements of log N(x_next_n; mean_n, step_std_n^2)   (fp32 accumulation)
        ratio_n    = exp(log_prob_n - old_log_prob_n)
        loss       = mean_n max(-A_n ratio_n, -A_n clip(ratio_n, 1 - clip_range, 1 + clip_range))
                     + beta * mean_n kl_n,   kl_n = mean((mean_n - mean_ref_n)^2) / (2 kl_std_n^2)

    On CUDA this is one fused Triton kernel that reads x_next, mean (and mean_ref) once and does the
    per-sample math on the device; the backward is one kernel writing d loss / d mean in a single pass.
    Neither syncs with the host, and torch.compile(fullgraph=True) traces through both.

    Several trained timesteps go in one call by stacking them along N (each row brings its own
    old_log_prob, advantage and step_std): the loss is then the mean over all T * N rows, i.e. 1 / T
    times the sum of the per-timestep losses that Flow-GRPO accumulates.

    Args:
        x_next: (N, ...) the sampled step (sde_step_with_logprob's x_next), any float dtype. Not
            differentiated (a sample, as in Flow-GRPO).
        mean: (N, ...) the current policy's step mean; carries the gradient.
        old_log_prob: (N,) log_prob of x_next under the rollout policy (sde_step_with_logprob's log_prob).
        advantages: (N,) e.g. from `group_advantages`.
        step_std: (N,) the step's std (sde_step_with_logprob's step_std), > 0.
        clip_range: >= 0, PPO's epsilon; tiny (~1e-4) because log_prob is a mean over ~1e5 elements.
        mean_ref: (N, ...) the reference policy's step mean, for the KL term (not differentiated).
        beta: >= 0, the KL weight; beta > 0 needs mean_ref. With beta = 0 and mean_ref given, kl is
            still reported in the stats.
        kl_std: (N,) the std in the KL's denominator, > 0; defaults to step_std.
        kind: "sde" (Gaussian log-prob) or "cps" (log_prob = -mean((x_next - mean)^2)); must match how
            old_log_prob was computed (keyword only, at the end).

    Returns:
        loss: () float32 (float64 if an input is float64).
        stats: dict of detached tensors: "log_prob", "ratio", "kl" (N,) and "clip_fraction" (), the share
            of samples with |ratio - 1| > clip_range.

    Raises:
        TypeError / ValueError naming the argument for bad shapes, dtypes, devices, kinds and numbers.
        step_std <= 0 raises on CPU; on CUDA values are not read back (no sync) and such a sample's
        log_prob, hence the loss, is NaN.
    """
    fn = "flow_grpo_loss"
    if kind not in _KINDS:
        raise ValueError(f"{fn}: kind must be one of {_KINDS} (as in sde_step_with_logprob), got {kind!r}")
    _check_batch_tensor(fn, "mean", mean)
    _check_batch_tensor(fn, "x_next", x_next, like=mean)
    if mean_ref is not None:
        _check_batch_tensor(fn, "mean_ref", mean_ref, like=mean)
    n = mean.shape[0]
    per_sample = mean[0].numel()
    if per_sample == 0 or per_sample >= 2**31:
        raise ValueError(f"{fn}: each sample must hold between 1 and 2^31 - 1 elements, got shape {tuple(mean.shape)}")
    kl_std = step_std if kl_std is None else kl_std
    for name, t in (
        ("old_log_prob", old_log_prob),
        ("advantages", advantages),
        ("step_std", step_std),
        ("kl_std", kl_std),
    ):
        _check_per_sample(fn, name, t, n, mean.device)
    clip_range = _check_real(fn, "clip_range", clip_range, 0.0)
    beta = _check_real(fn, "beta", beta, 0.0)
    if beta > 0 and mean_ref is None:
        raise ValueError(f"{fn}: beta = {beta} > 0 weighs a KL to the reference policy: pass its step mean as mean_ref")
    loss, log_prob, ratio, kl, clip_fraction, _ = _ops.flow_grpo_loss(
        x_next, mean, mean_ref, old_log_prob, advantages, step_std, kl_std, clip_range, beta, kind == "sde"
    )
    return loss, {"log_prob": log_prob, "ratio": ratio, "kl": kl, "clip_fraction": clip_fraction}
