"""MSGRPO: Flow-GRPO on multi-reference rollouts (the paper's RL stage).

One RL step:
  1. rollouts: ``prompts_per_step`` tasks x ``group_size`` samples (a group shares prompt and references),
     split across ranks; each rank samples its share as ONE packed batch through `uniref.sampling.denoise`,
     with SDE steps inside the window (`uniref.sde_step_with_logprob`, storing latents and log-probs) and
     Euler (ODE) steps outside; the prompts are encoded once per rollout and reused by every step;
  2. rewards from a multi-source reward ``(N, S)``; advantages with `uniref.group_advantages` over the
     whole global batch (groups may span ranks);
  3. for each trained (window) timestep: recompute the step mean under the current policy (with grad),
     `uniref.flow_grpo_loss` against the stored sample and old log-prob, backward; DeepSpeed accumulates
     the gradients over the timesteps and steps once.
Every noise tensor is keyed by (seed, step, global sample index), so ranks and resumes agree.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from uniref.grpo import flow_grpo_loss, group_advantages
from uniref.packing import pack_latents, unpack_latents
from uniref.sampling import SamplingBatch, Schedule, denoise, euler_step, make_schedule, sde_step_with_logprob
from uniref.synthetic import EDIT_KINDS, sample_task
from uniref.training.collective import all_finite, global_mean
from uniref.training.modules import PromptBatch, compute_dtype
from uniref.training.seeding import generator_for, seed_for

__all__ = [
    "Rollout",
    "RolloutPrompt",
    "RewardFn",
    "load_reward",
    "phase_at",
    "rollout",
    "rollout_tasks",
    "train_on_rollout",
    "window",
]


PhaseData = Literal["compose", "edit", "mixed"]  # a phase's synthetic tasks: compositions, edits or a mix


@dataclass
class RewardFn:
    """A multi-source reward: ``fn(records, images (N, 3, H, W) float in [0, 1]) -> (N, S)`` (records: the
    synthetic world's `Task` objects, or a dataset's `uniref.data.EditRecord` rows), its source
    names, the overall score logged beside the sources, and its default per-source weights."""

    fn: Callable
    names: tuple[str, ...] | None
    overall: Callable[[Tensor], Tensor] | None
    weights: list[float] | None = None


def load_reward(spec: str, sources: list[dict] | None = None) -> RewardFn:
    """``"synthetic"`` (the world's integration, consistency, quality), ``"module:function"``, or with
    ``sources`` (``msgrpo.rewards``) the `uniref.rewards` sources side by side with their weights."""
    if sources is not None:
        from uniref.rewards import MultiSource
        from uniref.training.config import ConfigError

        try:
            multi = MultiSource(sources)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"msgrpo.rewards: {exc}") from exc
        return RewardFn(multi, multi.names, None, multi.weights)
    if spec == "synthetic":
        from uniref.synthetic import REWARD_NAMES, combine, score_batch

        return RewardFn(score_batch, tuple(REWARD_NAMES), combine)
    from uniref.training.config import ConfigError

    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"msgrpo.reward: cannot import {spec!r} ({exc}); is its module on PYTHONPATH?") from exc
    if not callable(fn):
        raise ConfigError(f"msgrpo.reward: {spec!r} is not callable")
    return RewardFn(fn, getattr(fn, "names", None), None)


def phase_at(msgrpo_cfg, step: int):
    """The phase that RL step ``step`` (0-based) belongs to."""
    for phase in msgrpo_cfg.phases:
        if step < phase.steps:
            return phase
        step -= phase.steps
    return msgrpo_cfg.phases[-1]


def window(msgrpo_cfg) -> range:
    """The SDE (trained) steps; by default every step but the last, an ODE step onto clean latents."""
    start, stop = msgrpo_cfg.sde_window or (0, msgrpo_cfg.num_steps - 1)
    return range(start, stop)


@dataclass
class RolloutPrompt:
    """What a group of rollouts is sampled from: a prompt, its reference images, the target side, and the
    record it came from (a synthetic `Task`, or a dataset row's `uniref.data.EditRecord`), which the rewards
    receive: ``reward(records, images)``."""

    record: object
    prompt: str
    images: list
    size: int


def rollout_tasks(msgrpo_cfg, data_cfg, seed: int, step: int) -> list[RolloutPrompt]:
    """The step's global list of prompts, one per group: synthetic tasks of the step's phase, or rows of
    ``data.source`` (drawn by a generator keyed by the step, so ranks and resumes agree; targets optional).
    With ``prompt_pool`` they cycle through a fixed pool."""
    if data_cfg.source != "synthetic":
        records = _records(
            data_cfg.source, data_cfg.root, tuple(sorted(data_cfg.keys.items())), data_cfg.allow_outside_root
        )
        out = []
        for j in range(msgrpo_cfg.prompts_per_step):
            index = step * msgrpo_cfg.prompts_per_step + j
            if msgrpo_cfg.prompt_pool is not None:
                index %= msgrpo_cfg.prompt_pool
            record = records[seed_for(seed, "rl-row", index) % len(records)]
            out.append(RolloutPrompt(record, record.prompt, record.reference_images(), data_cfg.size))
        return out
    phase = phase_at(msgrpo_cfg, step)
    lo, hi = phase.num_refs or data_cfg.num_refs
    kinds = list(data_cfg.edit_kinds or EDIT_KINDS)
    tasks = []
    for j in range(msgrpo_cfg.prompts_per_step):
        index = step * msgrpo_cfg.prompts_per_step + j
        if msgrpo_cfg.prompt_pool is not None:
            index %= msgrpo_cfg.prompt_pool
        rng = torch.Generator().manual_seed(seed_for(seed, "rl-task", phase.data, index))
        family = phase.data
        if family == "mixed":
            family = "compose" if torch.rand(1, generator=rng).item() < data_cfg.compose_ratio else "edit"
        task_seed = int(torch.randint(0, 2**62, (1,), generator=rng))
        if family == "compose":
            k = int(torch.randint(lo, hi + 1, (1,), generator=rng))
            task = sample_task(task_seed, "compose", k, data_cfg.size, "train")
        else:
            kind = kinds[int(torch.randint(0, len(kinds), (1,), generator=rng))]
            task = sample_task(task_seed, kind, None, data_cfg.size, "train")
        tasks.append(RolloutPrompt(task, task.prompt, list(task.images), task.spec.size))
    return tasks


@functools.lru_cache(maxsize=4)
def _records(source: str, root, keys: tuple, allow_outside_root: bool):
    from uniref.data import open_dataset

    return open_dataset(source, root, dict(keys), allow_outside_root)


@dataclass
class Rollout:
    """This rank's share of a step's rollouts (N local samples, all with one target size)."""

    tasks: list[RolloutPrompt]
    group_ids: Tensor  # (N,) global task index
    prompts: PromptBatch  # encoded once: N conditional prompts, then N negative ones with guidance
    batch: SamplingBatch
    schedule: Schedule  # per-sample sigmas (N, num_steps + 1) and model times (N, num_steps)
    states: list[Tensor]  # num_steps + 1 packed float32 target states (T_target, F)
    log_probs: dict[int, Tensor]  # trained step -> (N,)
    images: Tensor  # (N, 3, H, W) in [0, 1]
    ref_latents: list[list[Tensor]]  # per sample, its references' latents
    rewards: Tensor | None = None  # (N, S)
    advantages: Tensor | None = None  # (N,)

    def subset(self, rows: list[int]) -> "Rollout":
        """The rollouts ``rows`` alone, re-packed (a minibatch of the policy update)."""
        n = len(self.tasks)
        pick = lambda x: _per_sample(x, n)[rows].reshape(-1, x.shape[-1])  # noqa: E731
        targets = self.batch.targets
        batch = SamplingBatch.build(
            [targets.image_sizes[r][0] for r in rows],
            [self.ref_latents[r] for r in rows],
            self.batch.copies,
            targets.patch_size,
            targets.channels,
            self.batch.reference_tokens.device,
            self.batch.reference_tokens.dtype,
        )
        prompt_rows = rows + [n + r for r in rows] if self.batch.copies == 2 else rows
        return Rollout(
            [self.tasks[r] for r in rows],
            self.group_ids[rows],
            self.prompts.select(prompt_rows),
            batch,
            Schedule(self.schedule.sigmas[rows], self.schedule.timesteps[rows]),
            [pick(x) for x in self.states],
            {k: v[rows] for k, v in self.log_probs.items()},
            self.images[rows],
            [self.ref_latents[r] for r in rows],
            None if self.rewards is None else self.rewards[rows],
            None if self.advantages is None else self.advantages[rows],
        )


def _per_sample(x: Tensor, n: int) -> Tensor:
    return x.reshape(n, -1, x.shape[-1])


def _model_fn(model, prompts: PromptBatch):
    def fn(hidden, t, layout):
        return model(hidden, t, layout, prompts)

    return fn


@torch.no_grad()
def rollout(
    engine, pipe, tasks: list[RolloutPrompt], msgrpo_cfg, seed: int, step: int, rank: int, world: int
) -> Rollout:
    """Samples this rank's share of ``len(tasks) * group_size`` rollouts with per-step log-probs."""
    g_size = msgrpo_cfg.group_size
    n = len(tasks) * g_size // world
    rows = list(range(rank * n, (rank + 1) * n))
    local_tasks = [tasks[r // g_size] for r in rows]
    device = pipe.vae.device
    dtype = compute_dtype(engine.module)

    # references: planned under the pixel budget, encoded once per task
    f, p = pipe.vae_scale_factor, pipe.patch_size
    encoded: dict[int, list[Tensor]] = {}
    for r in rows:
        ti = r // g_size
        if ti not in encoded:
            t = tasks[ti]
            sizes = pipe.plan_sizes([t.images], msgrpo_cfg.pixel_budget, msgrpo_cfg.budget_mode, None, None)[0][1]
            encoded[ti] = [z.to(device, dtype) for z in pipe.encode_sized(list(t.images), sizes)]
    size = {t.size for t in local_tasks}
    if len(size) != 1:
        raise ValueError(f"MSGRPO needs one target size per rollout batch, got {sorted(size)}")
    side = size.pop()
    c = pipe.latent_channels
    gens = [generator_for(seed, "rollout", step, r) for r in rows]
    noise = [torch.randn((c, side // f, side // f), generator=gen).to(device, dtype) for gen in gens]
    guided = msgrpo_cfg.cfg_scale > 1
    ref_latents = [encoded[r // g_size] for r in rows]
    batch = SamplingBatch.build([(side // f, side // f)] * n, ref_latents, 2 if guided else 1, p, c, device, dtype)
    texts = [t.prompt for t in local_tasks]
    images = [list(t.images) for t in local_tasks]
    prompts = engine.module.encode(texts + [""] * n if guided else texts, images * 2 if guided else images)

    schedule = make_schedule(pipe.scheduler, batch.targets.target_lengths, msgrpo_cfg.num_steps, device)
    trained = window(msgrpo_cfg)
    log_probs: dict[int, Tensor] = {}

    def step_fn(k, state, v, schedule, targets):
        if k not in trained:
            return euler_step(k, state, v, schedule, targets)
        z = torch.stack([torch.randn(state.shape[0] // n, state.shape[1], generator=gen) for gen in gens]).to(device)
        x_next, _, log_prob, _ = sde_step_with_logprob(
            _per_sample(state, n),
            _per_sample(v, n),
            schedule.sigmas[:, k],
            schedule.sigmas[:, k + 1],
            msgrpo_cfg.noise_level,
            msgrpo_cfg.kind,
            noise=z,
        )
        log_probs[k] = log_prob
        return x_next.reshape(state.shape).float()

    state = pack_latents([[x] for x in noise], patch_size=p).tokens.float()
    states = [state]
    state = denoise(
        _model_fn(engine, prompts),
        batch,
        schedule,
        state,
        msgrpo_cfg.cfg_scale,
        step_fn,
        callback=lambda k, x: states.append(x),
        dtype=dtype,
    )

    latents = torch.stack([sample[0] for sample in unpack_latents(state.to(dtype), batch.targets)])
    images_out = ((pipe.decode_latents(latents).float() + 1) / 2).clamp(0, 1)
    group_ids = torch.tensor([step * len(tasks) + r // g_size for r in rows], device=device)
    return Rollout(local_tasks, group_ids, prompts, batch, schedule, states, log_probs, images_out, ref_latents)


def score_rollout(ro: Rollout, reward: RewardFn, msgrpo_cfg) -> dict:
    """Fills ``ro.rewards`` and ``ro.advantages`` (collective over ranks); returns the reward statistics."""
    rewards = reward.fn([t.record for t in ro.tasks], ro.images.cpu())
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.ndim == 1:
        rewards = rewards[:, None]
    if rewards.ndim != 2 or rewards.shape[0] != len(ro.tasks):
        raise ValueError(
            f"msgrpo.reward returned shape {tuple(rewards.shape)}; it must return (N, S) for N = {len(ro.tasks)}"
        )
    weights = msgrpo_cfg.reward_weights if msgrpo_cfg.reward_weights is not None else reward.weights
    if weights is not None and len(weights) != rewards.shape[1]:
        raise ValueError(f"msgrpo.reward_weights has {len(weights)} entries for {rewards.shape[1]} reward sources")
    if not all_finite(rewards):
        bad = (~torch.isfinite(rewards)).any(1).nonzero().flatten().tolist()
        where = f"for rollout {bad[0]} (task: {ro.tasks[bad[0]].prompt!r})" if bad else "on another rank"
        raise FloatingPointError(f"non-finite reward {where}; the run stops here, the last checkpoint is intact")
    adv, stats = group_advantages(
        rewards,
        ro.group_ids.cpu(),
        weights=weights,
        aggregate=msgrpo_cfg.aggregate,
        std=msgrpo_cfg.adv_std,
        clip=msgrpo_cfg.adv_clip,
    )
    dropped = None
    if msgrpo_cfg.group_filter is not None:
        adv, dropped = _filter_groups(rewards, ro.group_ids.cpu(), weights, adv, *msgrpo_cfg.group_filter)
    ro.rewards, ro.advantages = rewards, adv
    names = reward.names or tuple(f"source{i}" for i in range(rewards.shape[1]))
    out = {f"reward/{name}": float(m) for name, m in zip(names, stats["source_mean"])}
    w = torch.tensor(weights or [1.0] * rewards.shape[1])
    local = {"reward/weighted": (rewards * w).sum(1).mean()}
    if reward.overall is not None:
        local["reward/overall"] = reward.overall(rewards).mean()
    out.update(global_mean(local))
    out["zero_std_fraction"] = float(stats["zero_std_fraction"])
    if dropped is not None:
        out["group_filter/dropped"] = dropped
    return out


def _filter_groups(rewards: Tensor, group_ids: Tensor, weights, adv: Tensor, eps: float, min_mean: float):
    """Edit-R1's filter over the whole step (groups may span ranks): the advantages of every sample of a group
    whose weighted reward has std < eps and mean > min_mean become 0 (it teaches nothing). Returns the
    advantages and the fraction of groups dropped."""
    import torch.distributed as dist

    from uniref.rewards import filter_groups

    combined = (rewards * torch.tensor(weights or [1.0] * rewards.shape[1])).sum(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(combined) for _ in range(world)], [torch.empty_like(group_ids) for _ in range(world)]
        dist.all_gather(parts[0], combined)
        dist.all_gather(parts[1], group_ids)
        keep, dropped = filter_groups(torch.cat(parts[0]), torch.cat(parts[1]), eps, min_mean)
        keep = keep[rank * len(combined) : (rank + 1) * len(combined)]
    else:
        keep, dropped = filter_groups(combined, group_ids, eps, min_mean)
    return adv * keep.to(adv.dtype), dropped


def train_on_rollout(engine, ro: Rollout, msgrpo_cfg, ref_model=None, adapters_off=None) -> dict:
    """The policy update of one RL step: the rollouts in ``msgrpo.minibatches`` minibatches, each one
    optimizer step that accumulates the clipped loss over the trained timesteps (one DeepSpeed
    micro-step each). From the second minibatch on the policy has moved, so the PPO ratio and its clip
    take effect, as in Flow-GRPO's inner updates.

    ``ref_model`` / ``adapters_off``: the frozen reference policy for the KL term (a copy of the
    starting model, or a context manager that disables LoRA adapters), needed when ``kl_beta > 0``.
    """
    n, m = len(ro.tasks), msgrpo_cfg.minibatches
    parts = [
        _update(
            engine,
            ro if m == 1 else ro.subset(list(range(j * n // m, (j + 1) * n // m))),
            msgrpo_cfg,
            ref_model,
            adapters_off,
        )
        for j in range(m)
    ]
    ratio = torch.cat([p.pop("ratio") for p in parts])
    local = {k: torch.stack([p[k] for p in parts]).mean() for k in parts[0]}
    local.update(ratio_mean=ratio.mean(), ratio_abs_dev_max=(ratio - 1).abs().max())
    return global_mean(local)


def _update(engine, ro: Rollout, msgrpo_cfg, ref_model, adapters_off) -> dict:
    """One optimizer step on the rollouts ``ro``; returns this rank's loss statistics."""
    n = len(ro.tasks)
    model_fn = _model_fn(engine, ro.prompts)
    dtype = compute_dtype(engine.module)
    adv = ro.advantages.to(ro.states[0].device)
    stats = {"loss": [], "clip_fraction": [], "kl": [], "ratio": []}
    for k in sorted(ro.log_probs):
        s, s_next, t = ro.schedule.sigmas[:, k], ro.schedule.sigmas[:, k + 1], ro.schedule.timesteps[:, k].to(dtype)
        state, x_next = ro.states[k], _per_sample(ro.states[k + 1], n)
        v = ro.batch.velocity(model_fn, state, t, msgrpo_cfg.cfg_scale)
        _, mean, _, step_std = sde_step_with_logprob(
            _per_sample(state, n),
            _per_sample(v, n),
            s,
            s_next,
            msgrpo_cfg.noise_level,
            msgrpo_cfg.kind,
            prev_sample=x_next,
        )
        mean_ref = None
        if msgrpo_cfg.kl_beta > 0:
            with torch.no_grad():
                if adapters_off is not None:
                    with adapters_off():
                        v_ref = ro.batch.velocity(model_fn, state, t, msgrpo_cfg.cfg_scale)
                else:
                    # a reference policy with its own text encoder encodes the prompts itself
                    prompts = ro.prompts.without_embeds() if ref_model.train_text_encoder else ro.prompts
                    v_ref = ro.batch.velocity(_model_fn(ref_model, prompts), state, t, msgrpo_cfg.cfg_scale)
                _, mean_ref, _, _ = sde_step_with_logprob(
                    _per_sample(state, n),
                    _per_sample(v_ref, n),
                    s,
                    s_next,
                    msgrpo_cfg.noise_level,
                    msgrpo_cfg.kind,
                    prev_sample=x_next,
                )
        loss, st = flow_grpo_loss(
            x_next,
            mean,
            ro.log_probs[k],
            adv,
            step_std,
            msgrpo_cfg.clip_range,
            mean_ref=mean_ref,
            beta=msgrpo_cfg.kl_beta,
            kind=msgrpo_cfg.kind,
        )
        if not all_finite(loss.detach()):
            raise FloatingPointError(
                f"non-finite MSGRPO loss at rollout step {k}; the run stops here, the last checkpoint is intact"
            )
        engine.backward(loss)
        engine.step()
        stats["loss"].append(loss.detach())
        stats["clip_fraction"].append(st["clip_fraction"])
        stats["kl"].append(st["kl"].mean())
        stats["ratio"].append(st["ratio"])
    return {
        "loss": torch.stack(stats["loss"]).mean(),
        "clip_fraction": torch.stack(stats["clip_fraction"]).float().mean(),
        "kl": torch.stack(stats["kl"]).mean(),
        "ratio": torch.cat(stats["ratio"]),
    }
