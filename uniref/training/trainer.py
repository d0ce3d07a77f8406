"""The training loop behind ``training/run.py``: processes and DeepSpeed, the run folder, resume,
checkpoints and metrics. What each task builds, does per step and exports is its task object's
(`uniref.training.tasks`)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from uniref.training.checkpoint import (
    CheckpointError,
    check_resumable,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from uniref.training.collective import broadcast_text
from uniref.training.config import ConfigError, TrainConfig
from uniref.training.metrics import MetricsLog, plot_curves
from uniref.training.rundir import RunFolderError, prepare_output
from uniref.training.schedule import lr_lambda
from uniref.training.tasks import task_for

__all__ = ["deepspeed_config", "lr_lambda", "train"]


# --------------------------------------------------------------------------------------------
# Processes and DeepSpeed
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_shm_comm_op(deepspeed) -> None:
    """Keeps DeepSpeed from JIT-building its CPU shared-memory all-reduce op at process-group setup.

    That op serves only ``inference_all_reduce``, which training never calls, yet building it costs a C++
    compile on every fresh machine, a killed build leaves a lock in ``~/.cache/torch_extensions`` on which
    every later run waits forever, and each process leaks a 64 MiB ``/dev/shm`` buffer it never unlinks.
    Gradient reduction goes through the gloo / nccl process group either way.
    """
    try:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (AttributeError, TypeError):  # a DeepSpeed without the probe table has no such op to skip
        pass


def setup_distributed() -> tuple[int, int, torch.device]:
    """Joins (or, under plain ``python``, creates) the process group: gloo on CPU, nccl on GPUs."""
    if "RANK" not in os.environ:  # plain `python training/run.py`: a world of one
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    _skip_shm_comm_op(deepspeed)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def accumulation_steps(cfg: TrainConfig, world: int) -> int:
    """Micro-batches each rank accumulates per optimizer step."""
    return task_for(cfg).accumulation_steps(world)


def deepspeed_config(cfg: TrainConfig, world: int) -> dict:
    """The DeepSpeed JSON: generated from the config, or ``deepspeed.config`` checked against it."""
    gas = accumulation_steps(cfg, world)
    if cfg.deepspeed.config is not None:
        ds = json.loads(Path(cfg.deepspeed.config).read_text())
        for key in ("optimizer", "scheduler"):
            if key in ds:
                raise ConfigError(f"deepspeed.config {cfg.deepspeed.config}: remove {key!r}; uniref sets it from optim")
        if ds.get("gradient_accumulation_steps", gas) != gas:
            raise ConfigError(
                f"deepspeed.config {cfg.deepspeed.config}: gradient_accumulation_steps="
                f"{ds['gradient_accumulation_steps']} but this run accumulates {gas} micro-batches per step"
            )
        ds.update(gradient_accumulation_steps=gas, train_micro_batch_size_per_gpu=1)
        ds.pop("train_batch_size", None)
        return ds
    zero = {"stage": cfg.deepspeed.zero_stage}
    for key in ("offload_optimizer", "offload_param"):
        if getattr(cfg.deepspeed, key) != "none":
            zero[key] = {"device": getattr(cfg.deepspeed, key), "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": 1,  # one packed micro-batch (a token budget, not a sample count)
        "gradient_accumulation_steps": gas,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.deepspeed.bf16},
        "steps_per_print": 2**31 - 1,
        "zero_allow_untested_optimizer": True,
    }


def optimizer_lr(engine) -> float:
    """The learning rate the coming optimizer step uses."""
    return float(engine.optimizer.param_groups[0]["lr"])


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _open_run(cfg: TrainConfig, resume: str | None, overwrite: bool, rank: int):
    """Rank 0 locks the run folder, checks it and picks the checkpoint; every rank learns the outcome.

    Returns the held lock (rank 0; None elsewhere), the checkpoint to resume from (or None), a string the
    same on every rank and unique to this run (temporary names) and the notes to print.
    """
    lock, outcome, failure = None, {}, None
    if rank == 0:
        try:
            lock, warning = prepare_output(cfg.output, resume, overwrite)
            notes = [warning] if warning else []
            skipped: list[str] = []
            checkpoint = find_checkpoint(resume, cfg.output, skipped) if resume else None
            notes += [f"--resume auto: skipped checkpoint {line}" for line in skipped]
            if checkpoint is not None:
                check_resumable(checkpoint, cfg.to_dict(), cfg.total_steps)
            elif resume == "auto":
                notes.append(f"--resume auto: no complete checkpoint in {cfg.output}; starting at step 0")
            outcome = {
                "checkpoint": str(checkpoint) if checkpoint else None,
                "notes": notes,
                "tag": f"{os.getpid()}-{time.time_ns()}",
            }
        except Exception as exc:  # whatever it is, the other ranks must hear of it rather than wait
            if lock is not None:
                lock.release()
            failure, outcome = exc, {"error": str(exc), "kind": type(exc).__name__}
    outcome = json.loads(broadcast_text(json.dumps(outcome)))
    if failure is not None:
        raise failure
    if "error" in outcome:
        raise (CheckpointError if outcome["kind"] == "CheckpointError" else RunFolderError)(outcome["error"])
    checkpoint = Path(outcome["checkpoint"]) if outcome["checkpoint"] else None
    return lock, checkpoint, outcome["tag"], outcome["notes"]


def train(cfg: TrainConfig, resume: str | None = None, overwrite: bool = False) -> Path:
    """Runs a whole training job; returns the output folder. Every rank calls it.

    ``resume``: ``"auto"`` or a checkpoint folder; ``overwrite``: replace the run already in ``cfg.output``
    (without either, a folder that holds a run is refused).
    """
    cfg.check_environment()
    rank, world, device = setup_distributed()
    gas = accumulation_steps(cfg, world)
    ds_config = deepspeed_config(cfg, world)
    lock, checkpoint, tag, notes = _open_run(cfg, resume, overwrite, rank)
    try:
        return _train(cfg, rank, world, device, gas, ds_config, checkpoint, tag, notes)
    finally:
        if lock is not None:
            lock.release()


def _train(
    cfg: TrainConfig,
    rank: int,
    world: int,
    device,
    gas: int,
    ds_config: dict,
    checkpoint: Path | None,
    tag: str,
    notes: list[str],
) -> Path:
    import deepspeed

    out = Path(cfg.output)
    task = task_for(cfg)
    torch.manual_seed(cfg.seed)
    model = task.build(device)
    lora = cfg.model.lora is not None
    trainable = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    optimizer = torch.optim.AdamW(trainable, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    updates = cfg.total_steps * task.updates_per_step  # the schedule counts optimizer steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(updates, o.warmup_steps, o.schedule, o.min_lr_ratio)
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
        model_parameters=trainable,
    )

    state = {"step": 0, "cursor": 0, "stage": 0, "rl_step": 0}
    if checkpoint is not None:
        state.update(load_checkpoint(engine, checkpoint, exclude_frozen=lora))
    if rank == 0:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        (out / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=1))
    log = MetricsLog(out / "metrics.jsonl", enabled=rank == 0, resume_step=state["step"])
    for note in notes:
        log.warn(note)
    if checkpoint is not None:
        log.info(f"resumed from {checkpoint} at step {state['step']}")

    total = cfg.total_steps
    bar = None
    if rank == 0 and cfg.log.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=state["step"], desc=cfg.task, dynamic_ncols=True)
    while state["step"] < total:
        t0 = time.perf_counter()
        lr = optimizer_lr(engine)
        metrics = task.step(engine, state, rank, world, gas, device)
        grad_norm = engine.get_global_grad_norm()
        metrics.update(
            step=state["step"] + 1,
            lr=lr,
            grad_norm=float(grad_norm) if grad_norm is not None else None,
            seconds=time.perf_counter() - t0,
        )
        if "tokens" in metrics:
            metrics["tokens_per_s"] = metrics["tokens"] / metrics["seconds"]
        state["step"] += 1
        if state["step"] % cfg.log.every == 0 or state["step"] == total:
            log.write(metrics)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({task.progress_key: f"{metrics[task.progress_key]:.4f}"})
        if state["step"] % cfg.checkpoint.every == 0 or state["step"] == total:
            save_checkpoint(
                engine,
                out,
                state["step"],
                state,
                cfg.checkpoint.keep_last,
                exclude_frozen=lora,
                config=cfg.to_dict(),
                tmp_tag=tag,
            )
    if bar is not None:
        bar.close()
    task.export(engine, out, rank)
    if rank == 0 and cfg.log.plot:
        plot_curves(out / "metrics.jsonl", out / "curves.png")
    if dist.is_initialized():
        dist.barrier()
    return out
