"""The training tasks: what a run of each ``task`` builds, does per step and exports.

The trainer (`uniref.training.trainer`) owns the processes, DeepSpeed, the run folder, checkpoints and
logs; a task object owns the rest, through the small `Task` protocol:

    accumulation_steps(world)     micro-batches each rank accumulates per optimizer step
    updates_per_step              optimizer steps per training step (the LR schedule counts these)
    build(device)                 the module DeepSpeed trains (and whatever the steps need beside it)
    step(engine, state, ...)      one training step: its micro-batches, backward and optimizer steps
    export(engine, out, rank)     ``out/final``: what the run leaves for others to load
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import torch
import torch.distributed as dist
from torch import nn

from uniref.training.collective import all_finite

if TYPE_CHECKING:
    from uniref.training.config import TrainConfig

__all__ = ["MsgrpoTask", "SftTask", "Task", "TaskName", "VaeTask", "task_for"]

TaskName = Literal["vae", "sft", "msgrpo"]


class Task(Protocol):
    """What the trainer asks of a task (see the module docstring)."""

    cfg: TrainConfig
    progress_key: str  # the metric the progress bar shows

    @property
    def updates_per_step(self) -> int: ...

    def accumulation_steps(self, world: int) -> int: ...

    def build(self, device: torch.device) -> nn.Module: ...

    def step(self, engine, state: dict, rank: int, world: int, gas: int, device: torch.device) -> dict: ...

    def export(self, engine, out: Path, rank: int) -> Path: ...


def _save_atomically(model, final: Path) -> None:
    """``model.save_pretrained`` into a temporary folder, then renamed over ``final``."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _per_rank_micro_batches(cfg: TrainConfig, world: int) -> int:
    from uniref.training.config import ConfigError

    m = cfg.deepspeed.micro_batches_per_step
    if m % world:
        raise ConfigError(
            f"deepspeed.micro_batches_per_step={m} does not divide among {world} processes; make it a multiple of "
            f"{world} (each process accumulates micro_batches_per_step / world_size micro-batches)"
        )
    return m // world


class VaeTask:
    """``task: vae``: an `AutoencoderKL` on the world's images; exports it with its latents' statistics."""

    progress_key = "loss"
    updates_per_step = 1

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def accumulation_steps(self, world: int) -> int:
        return _per_rank_micro_batches(self.cfg, world)

    def build(self, device: torch.device) -> nn.Module:
        from uniref.training.vae import VAEModel, build_vae

        return VAEModel(build_vae(self.cfg.vae, self.cfg.seed).to(device).train())

    def step(self, engine, state: dict, rank: int, world: int, gas: int, device: torch.device) -> dict:
        from uniref.training.data import make_dataset
        from uniref.training.vae import vae_images, vae_loss

        cfg = self.cfg
        step, per = state["step"], cfg.vae.batch_size
        x, cursor = vae_images(make_dataset(cfg.data, cfg.seed), state["cursor"], per * gas * world, cfg.data.size)
        sums = torch.zeros(3, dtype=torch.float64)
        for position in range(rank, gas * world, world):
            loss, st = vae_loss(
                engine, x[position * per : (position + 1) * per].to(device), cfg.seed, step, position, cfg.vae.kl_weight
            )
            if not all_finite(loss.detach()):
                raise FloatingPointError(
                    f"non-finite VAE loss at step {step}; the run stops here and the last checkpoint is intact: "
                    "lower optim.lr"
                )
            engine.backward(loss)
            engine.step()
            sums += torch.tensor([float(loss.detach()), float(st["mse"]), float(st["kl"])], dtype=torch.float64)
        state["cursor"] = cursor
        if world > 1:
            dist.all_reduce(sums)
        loss, mse, kl = (sums / (gas * world)).tolist()
        return {"loss": loss, "mse": mse, "kl": kl, "samples": per * gas * world}

    def export(self, engine, out: Path, rank: int) -> Path:
        from uniref.training.data import make_dataset
        from uniref.training.vae import latent_stats, vae_images

        final = out / "final"
        if rank == 0:
            vae = copy.deepcopy(engine.module.vae).float().eval()
            x, _ = vae_images(make_dataset(self.cfg.data, self.cfg.seed + 1), 0, 256, self.cfg.data.size)
            mean, std = latent_stats(vae, x)
            vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
            _save_atomically(vae, final)
        return final


class _PipelineTask:
    """What SFT and MSGRPO share: the pipeline, the trained `EditModel`, the merged pipeline as export."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.pipe = None

    def build(self, device: torch.device) -> nn.Module:
        from uniref.training.modules import EditModel, build_pipeline

        m = self.cfg.model
        self.pipe = build_pipeline(m, self.cfg.seed).to(device)
        return EditModel(self.pipe.transformer, self.pipe.text_encoder, m.train_text_encoder, m.lora, m.base_dtype)

    def export_budget(self) -> int | None:
        """The reference budget the model trained with (the exported pipeline's default), None if per image."""
        raise NotImplementedError

    def export(self, engine, out: Path, rank: int) -> Path:
        import deepspeed

        from uniref.training.modules import merged_pipeline

        final = out / "final"
        params = list(engine.module.parameters())
        # ZeRO-3 holds each parameter in shards: gather them (all ranks) before rank 0 writes the whole model
        gather = (
            deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            if self.cfg.deepspeed.zero_stage == 3
            else contextlib.nullcontext()
        )
        with gather:
            if rank == 0:
                _save_atomically(
                    _Export(
                        merged_pipeline(self.pipe, engine.module, self.export_budget()),
                        engine.module.transformer,
                        self.cfg.model.lora,
                    ),
                    final,
                )
        return final


class _Export:
    """What ``final/`` holds: the merged pipeline and, for a LoRA run, the adapters alone in ``final/lora/`` in
    every format of ``model.lora.export``."""

    def __init__(self, pipe, trained_transformer, lora_cfg):
        from uniref.lora import adapter_weights

        self.pipe, self.formats = pipe, list(lora_cfg.export) if lora_cfg is not None else []
        self.adapters = adapter_weights(trained_transformer) if self.formats else None

    def save_pretrained(self, folder: Path) -> None:
        from uniref.lora import write_lora

        self.pipe.save_pretrained(folder)
        for fmt in self.formats:
            write_lora(self.adapters, Path(folder) / "lora", fmt)


def _stage_at(stages, step: int) -> int:
    for i, st in enumerate(stages):
        if step < st.steps:
            return i
        step -= st.steps
    return len(stages) - 1


class SftTask(_PipelineTask):
    """``task: sft``: flow matching on packed SELF batches, stage by stage (`uniref.training.sft`)."""

    progress_key = "loss"
    updates_per_step = 1

    def accumulation_steps(self, world: int) -> int:
        return _per_rank_micro_batches(self.cfg, world)

    def step(self, engine, state: dict, rank: int, world: int, gas: int, device: torch.device) -> dict:
        from uniref.training.data import make_dataset, plan_micro_batches
        from uniref.training.sft import sft_loss

        cfg, pipe = self.cfg, self.pipe
        step = state["step"]
        stage = _stage_at(cfg.sft.stages, step)
        budget = cfg.sft.stages[stage].pixel_budget
        dataset = make_dataset(cfg.data, cfg.seed)
        skipped: list[dict] = []
        skip = None
        if cfg.data.on_bad_row == "skip":

            def skip(i, exc):
                skipped.append({"step": step, "row": i, "reason": str(exc)})

        batches, cursor = plan_micro_batches(
            dataset,
            state["cursor"],
            gas * world,
            budget,
            cfg.sft.budget_mode,
            cfg.sft.token_budget,
            multiple=pipe.vae_scale_factor * pipe.patch_size,
            skip=skip,
        )
        if skipped and rank == 0:  # every rank plans the same global list: one of them records it
            with open(Path(cfg.output) / "skipped_rows.jsonl", "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in skipped)
        mine = batches[rank::world]
        losses, tokens, samples = [], 0, 0
        for mb in mine:
            loss, st = sft_loss(engine, pipe, mb, cfg.sft, cfg.seed, step)
            if not all_finite(loss.detach()):
                raise FloatingPointError(
                    f"non-finite SFT loss at step {step} (stage {stage}, budget {budget}); the run stops here and the "
                    "last checkpoint is intact: lower optim.lr or check the data"
                )
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())
            tokens += st["tokens"]
            samples += st["samples"]
        state.update(cursor=cursor, stage=stage)
        local = torch.tensor([float(torch.stack(losses).mean()), tokens, samples], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(local)
        return {
            "loss": float(local[0]) / world,
            "tokens": int(local[1]),
            "samples": int(local[2]),
            "stage": stage,
            "pixel_budget": budget,
        }

    def export_budget(self) -> int | None:
        return self.cfg.sft.stages[-1].pixel_budget if self.cfg.sft.budget_mode == "global" else None


class MsgrpoTask(_PipelineTask):
    """``task: msgrpo``: rollouts, rewards and clipped policy updates (`uniref.training.msgrpo`)."""

    progress_key = "reward/weighted"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.reward = None
        self.ref_model = None

    @property
    def updates_per_step(self) -> int:
        return self.cfg.msgrpo.minibatches

    def accumulation_steps(self, world: int) -> int:
        from uniref.training.config import ConfigError
        from uniref.training.msgrpo import window

        r = self.cfg.msgrpo
        rollouts = r.prompts_per_step * r.group_size
        if rollouts % (world * r.minibatches):
            raise ConfigError(
                f"msgrpo.prompts_per_step x group_size = {rollouts} rollouts do not split evenly over {world} "
                f"processes x msgrpo.minibatches={r.minibatches}; make it a multiple of their product"
            )
        return len(window(r))

    def build(self, device: torch.device) -> nn.Module:
        from uniref.training.msgrpo import load_reward

        self.reward = load_reward(self.cfg.msgrpo.reward, self.cfg.msgrpo.rewards)
        model = super().build(device)
        if self.cfg.msgrpo.kl_beta > 0 and self.cfg.model.lora is None:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        return model

    def step(self, engine, state: dict, rank: int, world: int, gas: int, device: torch.device) -> dict:
        from uniref.training.modules import adapters_disabled
        from uniref.training.msgrpo import phase_at, rollout, rollout_tasks, score_rollout, train_on_rollout

        cfg = self.cfg
        step = state["step"]
        tasks = rollout_tasks(cfg.msgrpo, cfg.data, cfg.seed, step)
        ro = rollout(engine, self.pipe, tasks, cfg.msgrpo, cfg.seed, step, rank, world)
        scores = score_rollout(ro, self.reward, cfg.msgrpo)
        # with LoRA the frozen reference policy is the base model: the adapters switched off
        adapters_off = (lambda: adapters_disabled(engine.module.transformer)) if cfg.model.lora is not None else None
        train = train_on_rollout(engine, ro, cfg.msgrpo, ref_model=self.ref_model, adapters_off=adapters_off)
        state["rl_step"] = step + 1
        return {**scores, **train, "phase": phase_at(cfg.msgrpo, step).data}

    def export_budget(self) -> int | None:
        return self.cfg.msgrpo.pixel_budget if self.cfg.msgrpo.budget_mode == "global" else None


_TASKS: dict[str, type] = {"vae": VaeTask, "sft": SftTask, "msgrpo": MsgrpoTask}


def task_for(cfg: TrainConfig) -> Task:
    """The task object of ``cfg.task``."""
    return _TASKS[cfg.task](cfg)
