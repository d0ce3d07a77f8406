"""The training configuration: one validated dataclass tree, read from YAML plus ``key=value`` overrides.

Every mistake is caught before any work starts and reported in one `ConfigError` that lists each
problem with its dotted key (``sft.stages[1].pixel_budget: must be an int > 0, got -4``): unknown keys
(with the closest known one), wrong types, and impossible combinations (MSGRPO without a group, a
micro-batch count that does not divide among the ranks, LoRA on a frozen model, ...). Each section
(dataclass) documents its fields where they are declared and checks them in its ``check``;
`TrainConfig.check` adds the rules that join sections. What depends on the machine the job runs on (the
model folders, the token budget's memory bound) is checked where the job starts, by
`TrainConfig.check_environment`. YAML is read as plain data (no aliases, no binary or date values).

The tree (defaults in the dataclasses below; `training/configs/*.yaml` are complete examples):

    task: vae | sft | msgrpo
    seed, output
    vae:        (task vae) the autoencoder's geometry, steps, images per micro-batch, KL weight
    model:      preset | pretrained | qwen_image_edit, vae, train_text_encoder, gradient_checkpointing, lora
    data:       the synthetic world's stream (size, compose_ratio, num_refs, edit_kinds)
    optim:      lr, betas, weight_decay, eps, warmup_steps, schedule, grad_clip
    deepspeed:  zero_stage, bf16, micro_batches_per_step, config (an explicit DeepSpeed JSON)
    sft:        stages [{pixel_budget, steps}], token_budget, logit-normal timesteps, change_weight
    msgrpo:     rollouts (group, steps, noise, SDE window, CFG), rewards, loss (clip, KL), phases
    checkpoint: every, keep_last
    log:        every, plot
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from uniref.grpo import AdvStd, Aggregate, SdeKind
from uniref.packing import BudgetMode
from uniref.training.msgrpo import PhaseData
from uniref.training.schedule import Schedule
from uniref.training.tasks import TaskName

__all__ = [
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "LoraConfig",
    "ModelConfig",
    "MSGRPOConfig",
    "OptimConfig",
    "PhaseConfig",
    "SFTConfig",
    "StageConfig",
    "TrainConfig",
    "VAEConfig",
    "load_config",
]


class ConfigError(ValueError):
    """A training configuration that cannot run; the message lists every problem found."""


# Choices are owned by the modules that implement them (the reference-budget modes by `uniref.packing`, the
# SDE kinds and advantage settings by `uniref.grpo`, the phase data by `msgrpo.py`, the task names and LR
# schedules by `tasks.py` and `schedule.py`); those of DeepSpeed's and of this config's own keys are here.
ZeroStage = Literal[0, 1, 2, 3]
Offload = Literal["none", "cpu"]
BadRow = Literal["error", "skip"]
BaseDtype = Literal["auto", "float8_e4m3fn"]

MAX_SEED = 2**32 - 1  # numpy's and most samplers' seed range; every seed of a run derives from this one


class _Checks:
    """Collects every problem of a config, one line each (``key: what is wrong``)."""

    def __init__(self, errors: list[str]):
        self.errors = errors

    def need(self, ok: bool, msg: str) -> None:
        if not ok:
            self.errors.append(msg)

    def int_at_least(self, v, key: str, low: int = 1, high: int | None = None) -> None:
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        self.need(ok, f"{key}: must be an int {bound}, got {v!r}")

    def number(self, v, key: str, low: float, high: float = math.inf, strict: bool = False) -> None:
        ok = (
            isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(v)
            and (low < v if strict else low <= v)
            and v <= high
        )
        self.need(ok, f"{key}: must be a finite number in {'(' if strict else '['}{low}, {high}], got {v!r}")

    def one_of(self, v, choices, key: str, quote: bool = False) -> None:
        """``v`` must be one of ``choices`` (a `Literal` alias or a sequence)."""
        options = typing.get_args(choices) or tuple(choices)
        names = [repr(c) if quote else str(c) for c in options]
        listed = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
        self.need(v in options, f"{key}: must be {listed}, got {v!r}")

    def ref_range(self, v: list, key: str) -> None:
        self.need(len(v) == 2 and 2 <= v[0] <= v[1] <= 6, f"{key}: must be [min, max] within 2..6, got {v!r}")


# --------------------------------------------------------------------------------------------
# The tree: each section documents its fields and checks them
# --------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """Low-rank adapters (peft) on the transformer's attention and MLP projections; the rest is frozen."""

    rank: int = 64  # the adapters' rank r
    alpha: float = 128.0  # scale numerator: the adapter's output is multiplied by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input, in [0, 1]
    # names of the transformer's linear layers that get adapters (peft's suffix match)
    target_modules: list[str] = field(
        default_factory=lambda: [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "to_add_out",
        ]
    )

    # LoRA file formats written to final/lora/ beside the merged model: diffusers (what diffusers' Qwen
    # pipelines' load_lora_weights reads), peft, kohya (ComfyUI); see uniref.lora
    export: list[str] = field(default_factory=lambda: ["diffusers"])
    # a LoRA file (any of those formats) to start from: its modules, ranks and alphas replace rank, alpha and
    # target_modules
    init: str | None = None

    def check(self, c: _Checks) -> None:
        from uniref.lora import FORMATS

        c.int_at_least(self.rank, "model.lora.rank")
        c.number(self.alpha, "model.lora.alpha", 0.0, strict=True)
        c.number(self.dropout, "model.lora.dropout", 0.0, 1.0)
        c.need(bool(self.target_modules), "model.lora.target_modules: must name at least one module")
        bad = [f for f in self.export if f not in FORMATS]
        c.need(not bad, f"model.lora.export: {bad} are not LoRA formats; choose from {list(FORMATS)}")


@dataclass
class ModelConfig:
    """Where the pipeline comes from (exactly one of ``preset``, ``pretrained``, ``qwen_image_edit``)."""

    preset: str | None = None  # a random-weight geometry of `uniref.presets.CONFIGS` (tiny, small, mid), seeded by seed
    # a local `UniRefEditPipeline.save_pretrained` folder (safetensors), or ``default`` for the shipped model
    pretrained: str | None = None
    qwen_image_edit: str | None = None  # a local diffusers ``QwenImageEditPlusPipeline`` folder (real-scale runs)
    overrides: dict = field(default_factory=dict)  # transformer config keys replacing the preset's (e.g. num_layers)
    vae: str | None = None  # a trained `AutoencoderKL` folder (a ``task: vae`` run's final) replacing the preset's VAE
    train_text_encoder: bool = False  # train the text encoder with the transformer (not with LoRA or Qwen2.5-VL)
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward pass
    # with gradient_checkpointing: recompute every k-th block only (1: all blocks; larger k keeps more
    # activations, for less recompute)
    checkpoint_every_k_blocks: int = 1
    attention_backend: str = "auto"  # a `uniref.varlen_attention` backend, or auto (the fastest available)
    lora: LoraConfig | None = None  # train LoRA adapters instead of the whole transformer
    # the frozen base under LoRA: auto (as loaded) or float8_e4m3fn (1 byte per weight, a scale per output
    # channel, computed in the input's dtype; uniref.models.float8)
    base_dtype: BaseDtype = "auto"

    def check(self, c: _Checks) -> None:
        from uniref.attention import BACKENDS
        from uniref.presets import CONFIGS

        c.int_at_least(self.checkpoint_every_k_blocks, "model.checkpoint_every_k_blocks")
        c.one_of(self.base_dtype, BaseDtype, "model.base_dtype")
        c.need(
            self.base_dtype == "auto" or self.lora is not None,
            "model.base_dtype: an 8-bit base is frozen, so it needs model.lora (adapters to train)",
        )

        if self.vae is not None:
            c.need(self.preset is not None, "model.vae: replaces a preset's VAE; a pretrained pipeline keeps its own")
        if self.preset is not None:
            c.need(self.preset in CONFIGS, f"model.preset: must be one of {tuple(CONFIGS)}, got {self.preset!r}")
            if self.preset in CONFIGS:
                known = set(CONFIGS[self.preset]["transformer"]) | {"zero_cond_t", "rope_scheme"}
                unknown = sorted(set(self.overrides) - known)
                c.need(not unknown, f"model.overrides: unknown transformer keys {unknown}; known: {sorted(known)}")
        if self.overrides and self.preset is None:
            c.errors.append("model.overrides: only applies to a preset (a pretrained model keeps its saved config)")
        if self.train_text_encoder and self.qwen_image_edit is not None:
            c.errors.append("model.train_text_encoder: the Qwen2.5-VL encoder stays frozen; set it to false")
        if self.lora is not None:
            self.lora.check(c)
            if self.train_text_encoder:
                c.errors.append(
                    "model.lora: LoRA trains adapters on the transformer only; set model.train_text_encoder: false"
                )
        c.need(
            self.attention_backend in ("auto", *BACKENDS), f"model.attention_backend: must be auto or one of {BACKENDS}"
        )

    def check_files(self, c: _Checks) -> None:
        """The model folders exist and hold safetensors weights (nothing else is ever loaded)."""
        if self.pretrained is not None and self.pretrained != "default":
            _check_pipeline_folder(
                c,
                "model.pretrained",
                Path(self.pretrained),
                "point it at a run's <output>/final or a UniRefEditPipeline.save_pretrained folder",
            )
        if self.qwen_image_edit is not None:
            _check_pipeline_folder(
                c,
                "model.qwen_image_edit",
                Path(self.qwen_image_edit),
                "point it at a local diffusers QwenImageEditPlusPipeline folder",
            )
        if self.lora is not None and self.lora.init is not None:
            from uniref.lora import LoraError, read_lora

            try:
                read_lora(self.lora.init)
            except LoraError as exc:
                c.errors.append(f"model.lora.init: {exc}")
        if self.vae is not None:
            folder = Path(self.vae)
            if not (folder / "config.json").is_file():
                c.errors.append(
                    f"model.vae: {folder} is not a saved AutoencoderKL folder (no config.json); train one "
                    "with a `task: vae` config"
                )
            else:
                _check_safetensors(c, "model.vae", folder)

    def geometry(self) -> tuple[int, int] | None:
        """(transformer blocks, hidden width) of the model this section builds, None where unknown."""
        if self.preset is not None:
            from uniref.presets import CONFIGS

            t = {**CONFIGS[self.preset]["transformer"], **self.overrides}
        else:
            if self.pretrained == "default":
                from uniref.pipelines.edit import DEFAULT_MODEL_DIR

                folder = DEFAULT_MODEL_DIR
            else:
                folder = Path(self.pretrained or self.qwen_image_edit)
            try:
                t = json.loads((folder / "transformer" / "config.json").read_text())
            except (OSError, ValueError):
                return None
        try:
            return int(t["num_layers"]), int(t["num_attention_heads"]) * int(t["attention_head_dim"])
        except (KeyError, TypeError, ValueError):
            return None


def _check_safetensors(c: _Checks, key: str, folder: Path) -> None:
    if any(folder.glob("*.bin")) and not any(folder.glob("*.safetensors")):
        c.errors.append(
            f"{key}: {folder} holds only .bin weights (pickles, which uniref never loads); save it again "
            "with safetensors (save_pretrained(..., safe_serialization=True))"
        )


def _check_pipeline_folder(c: _Checks, key: str, folder: Path, fix: str) -> None:
    index = folder / "model_index.json"
    if not index.is_file():
        c.errors.append(f"{key}: {folder} is not a saved pipeline folder (no model_index.json); {fix}")
        return
    try:
        components = [name for name, v in json.loads(index.read_text()).items() if isinstance(v, list)]
    except ValueError:
        c.errors.append(f"{key}: {index} is not valid JSON")
        return
    for name in components:
        if (folder / name).is_dir():
            _check_safetensors(c, key, folder / name)


@dataclass
class DataConfig:
    """The training data: the synthetic world's stream (`uniref.synthetic.SyntheticEditDataset`, split
    "train"), or a dataset of one of the layouts `uniref.data.open_dataset` reads."""

    # synthetic, or diffsynth:PATH | musubi:PATH | aitoolkit:PATH | hf:PATH (see uniref.data)
    source: str = "synthetic"
    root: str | None = None  # the folder the dataset's paths are relative to (default: the metadata's folder)
    keys: dict = field(default_factory=dict)  # field / column / folder names of the source (see uniref.data)
    # a row that cannot be read: error (stop with its id and reason) or skip (logged to OUTPUT/skipped_rows.jsonl)
    on_bad_row: BadRow = "error"
    allow_outside_root: bool = False  # let metadata name files outside data.root (../ or absolute paths)
    size: int = 64  # the synthetic target's side in pixels (references are planned from their own sizes)
    compose_ratio: float = 0.5  # fraction of compositions; the rest are single-image edits
    num_refs: list[int] = field(default_factory=lambda: [2, 6])  # [min, max] references of a composition, in 2..6
    edit_kinds: list[str] | None = None  # the edit families drawn (None: all of `uniref.synthetic.EDIT_KINDS`)
    # cycle through this many items (a fixed, small set: overfitting checks) instead of an endless stream
    length: int | None = None

    def check(self, c: _Checks) -> None:
        from uniref.data import SPEC_KINDS
        from uniref.synthetic import EDIT_KINDS

        kind, _, path = self.source.partition(":") if isinstance(self.source, str) else ("", "", "")
        c.need(
            kind in SPEC_KINDS and (kind == "synthetic") != bool(path),
            f"data.source: must be synthetic or one of {[k + ':PATH' for k in SPEC_KINDS[1:]]}, got {self.source!r}",
        )
        c.one_of(self.on_bad_row, BadRow, "data.on_bad_row")
        c.int_at_least(self.size, "data.size", 32)
        c.number(self.compose_ratio, "data.compose_ratio", 0.0, 1.0)
        c.ref_range(self.num_refs, "data.num_refs")
        if self.length is not None:
            c.int_at_least(self.length, "data.length")
        if self.edit_kinds is not None:
            bad = [k for k in self.edit_kinds if k not in EDIT_KINDS]
            c.need(
                bool(self.edit_kinds) and not bad,
                f"data.edit_kinds: must be a non-empty subset of {EDIT_KINDS}, got {self.edit_kinds!r}",
            )


@dataclass
class OptimConfig:
    """AdamW with linear warmup then a cosine (or constant) schedule; gradient-norm clipping."""

    lr: float = 1e-4  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW's (beta1, beta2), each in [0, 1)
    weight_decay: float = 0.05  # AdamW's decoupled weight decay
    eps: float = 1e-8  # AdamW's denominator epsilon
    warmup_steps: int = 0  # optimizer steps of linear warmup from lr / warmup_steps to lr
    schedule: Schedule = "cosine"  # after warmup: cosine decay to min_lr_ratio x lr over the run, or constant
    min_lr_ratio: float = 0.0  # the cosine's floor, as a fraction of lr
    grad_clip: float = 1.0  # global gradient-norm clip (0: off)

    def check(self, c: _Checks) -> None:
        c.number(self.lr, "optim.lr", 0.0, strict=True)
        c.need(
            len(self.betas) == 2 and all(isinstance(b, float) and 0 <= b < 1 for b in self.betas),
            f"optim.betas: must be two numbers in [0, 1), got {self.betas!r}",
        )
        c.number(self.weight_decay, "optim.weight_decay", 0.0)
        c.number(self.eps, "optim.eps", 0.0, strict=True)
        c.int_at_least(self.warmup_steps, "optim.warmup_steps", 0)
        c.one_of(self.schedule, Schedule, "optim.schedule")
        c.number(self.min_lr_ratio, "optim.min_lr_ratio", 0.0, 1.0)
        c.number(self.grad_clip, "optim.grad_clip", 0.0)


@dataclass
class DeepSpeedConfig:
    """How DeepSpeed runs."""

    zero_stage: ZeroStage = 2  # ZeRO stage: 0 (plain data parallel) to 3 (parameters sharded too)
    bf16: bool = False  # bf16 weights and activations (fp32 master weights in the optimizer)
    # the global number of packed micro-batches per optimizer step: each rank accumulates
    # micro_batches_per_step / world_size of them, so a run on 1 or N processes sees the same global batch
    micro_batches_per_step: int = 1
    # a DeepSpeed JSON used as given instead of the one generated from these keys (its accumulation must match)
    config: str | None = None
    # ZeRO-Offload: keep the optimizer states (and their update) in host memory ("cpu"; ZeRO stage >= 1), and
    # with ZeRO-3 the parameters too (offload_param); GPU memory for host memory and PCIe traffic
    offload_optimizer: Offload = "none"
    offload_param: Offload = "none"  # ZeRO-3 only: the parameters in host memory, fetched per module

    def check(self, c: _Checks) -> None:
        c.one_of(self.zero_stage, ZeroStage, "deepspeed.zero_stage")
        c.int_at_least(self.micro_batches_per_step, "deepspeed.micro_batches_per_step")
        c.one_of(self.offload_optimizer, Offload, "deepspeed.offload_optimizer")
        c.one_of(self.offload_param, Offload, "deepspeed.offload_param")
        c.need(
            self.offload_optimizer == "none" or self.zero_stage >= 1,
            "deepspeed.offload_optimizer: needs zero_stage >= 1 (the states it moves are ZeRO's partitions)",
        )
        c.need(
            self.offload_param == "none" or self.zero_stage == 3,
            "deepspeed.offload_param: needs zero_stage 3 (only ZeRO-3 partitions the parameters)",
        )
        if self.config is not None and not Path(self.config).is_file():
            c.errors.append(f"deepspeed.config: {self.config} is not a file; give a DeepSpeed JSON or remove the key")


@dataclass
class VAEConfig:
    """``task: vae``: a diffusers `AutoencoderKL` trained to reconstruct the world's images (targets and
    references, resized to ``data.size``): MSE plus ``kl_weight`` x KL. The export sets ``shift_factor`` /
    ``scaling_factor`` to the latents' mean and 1/std."""

    # channels per resolution level; each level after the first halves the resolution
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    latent_channels: int = 8  # channels of the latent image
    layers_per_block: int = 1  # resnet layers per level
    norm_num_groups: int = 8  # GroupNorm groups (divides every block_out_channels entry)
    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # images per micro-batch
    kl_weight: float = 1e-6  # weight of the posterior's KL to N(0, I)

    def check(self, c: _Checks) -> None:
        c.need(
            bool(self.block_out_channels)
            and all(
                isinstance(ch, int) and ch > 0 and ch % self.norm_num_groups == 0 for ch in self.block_out_channels
            ),
            f"vae.block_out_channels: must be positive multiples of vae.norm_num_groups={self.norm_num_groups}",
        )
        c.int_at_least(self.latent_channels, "vae.latent_channels")
        c.int_at_least(self.layers_per_block, "vae.layers_per_block")
        c.int_at_least(self.steps, "vae.steps")
        c.int_at_least(self.batch_size, "vae.batch_size")
        c.number(self.kl_weight, "vae.kl_weight", 0.0)


@dataclass
class StageConfig:
    """One stage of the progressive schedule."""

    pixel_budget: int = 0  # the references' total pixel area (SELF), or each one's in per_image mode
    steps: int = 0  # optimizer steps of this stage


@dataclass
class SFTConfig:
    """Flow matching on the target tokens: x_t = (1 - t) x_0 + t eps, target eps - x_0, t logit-normal
    then shifted as the scheduler shifts it for the sample's target token count."""

    stages: list[StageConfig] = field(default_factory=list)  # the progressive budgets, run in order
    token_budget: int = 4096  # image tokens per packed micro-batch (samples fill it; never padded)
    budget_mode: BudgetMode = "global"  # global: one budget for all references (SELF); per_image: each its own
    logit_mean: float = 0.0  # the logit-normal timestep distribution's mean
    logit_std: float = 1.0  # ... and its std
    text_dropout: float = 0.1  # fraction of prompts emptied (trains the unconditional branch for guidance)
    # extra loss weight (>= 0; 0: off) on the target's latent cells whose pixels differ from the first
    # reference's (the edited image, a composition's background), so the unchanged background that is
    # most of every target does not dominate the loss
    change_weight: float = 0.0

    def check(self, c: _Checks) -> None:
        c.need(bool(self.stages), "sft.stages: give at least one {pixel_budget, steps} stage")
        for i, st in enumerate(self.stages):
            c.int_at_least(st.pixel_budget, f"sft.stages[{i}].pixel_budget", 16 * 16)
            c.int_at_least(st.steps, f"sft.stages[{i}].steps")
        c.int_at_least(self.token_budget, "sft.token_budget", 1)
        c.one_of(self.budget_mode, BudgetMode, "sft.budget_mode")
        c.number(self.logit_std, "sft.logit_std", 0.0, strict=True)
        c.number(self.logit_mean, "sft.logit_mean", -math.inf)
        c.number(self.text_dropout, "sft.text_dropout", 0.0, 1.0)
        c.number(self.change_weight, "sft.change_weight", 0.0)


@dataclass
class PhaseConfig:
    """One MSGRPO phase (paper: compositions first, then single-image edits)."""

    data: PhaseData = "compose"  # compose, edit (single-image edits) or mixed (data.compose_ratio)
    steps: int = 0  # RL steps of this phase
    num_refs: list[int] | None = None  # [min, max] references of its compositions (None: data.num_refs)


@dataclass
class MSGRPOConfig:
    """Flow-GRPO on multi-reference rollouts (see `uniref.grpo`)."""

    phases: list[PhaseConfig] = field(default_factory=list)  # run in order
    prompts_per_step: int = 2  # tasks per RL step (over all ranks)
    group_size: int = 4  # rollouts per task (the group its advantages are normalized in)
    prompt_pool: int | None = None  # draw tasks from a fixed pool of this many (None: an endless stream)
    num_steps: int = 10  # denoising steps of a rollout
    noise_level: float = 0.7  # the SDE's noise scale (cps: must stay below 0.99)
    kind: SdeKind = "sde"  # sde (Flow-GRPO) or cps (coefficients-preserving sampling)
    sde_window: list[int] | None = None  # [start, stop) of the SDE steps that record log-probs (None: all but the last)
    cfg_scale: float = 1.0  # classifier-free guidance of the rollouts (1: off)
    pixel_budget: int = 8192  # the references' pixel budget of the rollouts
    budget_mode: BudgetMode = "global"  # as sft.budget_mode
    reward: str = "synthetic"  # synthetic (the world's three rewards) or module:function returning (N, S) rewards
    reward_weights: list[float] | None = None  # one weight per reward source (None: the reward's own)
    # reward sources of uniref.rewards instead of `reward`: [{name, weight, args}, ...], e.g. a served VLM judge
    # plus per-reference similarity (the weights: one number per source, or one per axis)
    rewards: list[dict] | None = None
    # [eps, min_mean]: drop the groups whose weighted reward has std < eps and mean > min_mean (Edit-R1:
    # [0.05, 0.9]); the fraction dropped is logged as group_filter/dropped
    group_filter: list[float] | None = None
    aggregate: Aggregate = "sum_then_normalize"  # weighted sum then group-normalize, or the reverse
    adv_std: AdvStd = "group"  # normalize advantages by each group's std or the whole batch's
    adv_clip: float = 5.0  # advantages clipped to [-adv_clip, adv_clip]
    clip_range: float = 1e-4  # the PPO ratio's clip
    kl_beta: float = 0.0  # weight of the KL to the starting model (0: off; with LoRA: adapters off)
    # optimizer steps per rollout batch (each on a slice of every rank's rollouts); with more than one the
    # PPO ratio moves away from 1 and the clip acts
    minibatches: int = 1

    def check(self, c: _Checks) -> None:
        c.need(bool(self.phases), "msgrpo.phases: give at least one {data, steps} phase (paper: compose, then edit)")
        for i, ph in enumerate(self.phases):
            c.one_of(ph.data, PhaseData, f"msgrpo.phases[{i}].data")
            c.int_at_least(ph.steps, f"msgrpo.phases[{i}].steps")
            if ph.num_refs is not None:
                c.ref_range(ph.num_refs, f"msgrpo.phases[{i}].num_refs")
        c.int_at_least(self.prompts_per_step, "msgrpo.prompts_per_step")
        c.int_at_least(self.group_size, "msgrpo.group_size", 2)
        if self.prompt_pool is not None:
            c.int_at_least(self.prompt_pool, "msgrpo.prompt_pool")
        c.int_at_least(self.num_steps, "msgrpo.num_steps", 2)
        c.number(self.noise_level, "msgrpo.noise_level", 0.0, strict=True)
        c.one_of(self.kind, SdeKind, "msgrpo.kind")
        if self.kind == "cps":
            c.number(
                self.noise_level, "msgrpo.noise_level (cps: sin(a pi / 2) must stay below 1)", 0.0, 0.99, strict=True
            )
        if self.sde_window is not None:
            w = self.sde_window
            c.need(
                len(w) == 2 and 0 <= w[0] < w[1] <= self.num_steps,
                f"msgrpo.sde_window: must be [start, stop) with 0 <= start < stop <= num_steps, got {w!r}",
            )
        c.number(self.cfg_scale, "msgrpo.cfg_scale", 1.0)
        c.int_at_least(self.pixel_budget, "msgrpo.pixel_budget", 16 * 16)
        c.one_of(self.budget_mode, BudgetMode, "msgrpo.budget_mode")
        c.need(
            self.reward == "synthetic" or ":" in self.reward,
            f"msgrpo.reward: must be 'synthetic' or 'module:function' returning (N, S) rewards, got {self.reward!r}",
        )
        if self.reward_weights is not None:
            c.need(
                bool(self.reward_weights) and all(math.isfinite(w) for w in self.reward_weights),
                "msgrpo.reward_weights: must be a non-empty list of finite numbers",
            )
        if self.rewards is not None:
            from uniref.rewards import available

            c.need(self.reward == "synthetic", "msgrpo.rewards replaces msgrpo.reward: remove one of them")
            c.need(bool(self.rewards), "msgrpo.rewards: give at least one {name, weight, args}")
            for i, spec in enumerate(self.rewards):
                ok = (
                    isinstance(spec, dict)
                    and spec.get("name") in available()
                    and not set(spec) - {"name", "weight", "args"}
                )
                c.need(
                    ok,
                    f"msgrpo.rewards[{i}]: must be {{name, weight, args}} with name one of {list(available())}, "
                    f"got {spec!r}",
                )
        if self.group_filter is not None:
            g = self.group_filter
            c.need(len(g) == 2 and g[0] >= 0, f"msgrpo.group_filter: must be [eps >= 0, min_mean], got {g!r}")
        c.one_of(self.aggregate, Aggregate, "msgrpo.aggregate")
        c.one_of(self.adv_std, AdvStd, "msgrpo.adv_std")
        c.number(self.adv_clip, "msgrpo.adv_clip", 0.0, strict=True)
        c.number(self.clip_range, "msgrpo.clip_range", 0.0)
        c.number(self.kl_beta, "msgrpo.kl_beta", 0.0)
        c.int_at_least(self.minibatches, "msgrpo.minibatches")


@dataclass
class CheckpointConfig:
    """When checkpoints are written (see `uniref.training.checkpoint`)."""

    every: int = 100  # optimizer steps between checkpoints (the last step always gets one)
    keep_last: int = 3  # complete checkpoints kept; older ones are removed

    def check(self, c: _Checks) -> None:
        c.int_at_least(self.every, "checkpoint.every")
        c.int_at_least(self.keep_last, "checkpoint.keep_last")


@dataclass
class LogConfig:
    """What a run reports."""

    every: int = 1  # steps between metrics.jsonl lines (the last step always gets one)
    plot: bool = True  # write curves.png at the end
    progress: bool = True  # a progress bar on rank 0

    def check(self, c: _Checks) -> None:
        c.int_at_least(self.every, "log.every")


@dataclass
class TrainConfig:
    """A whole training job; `load_config` reads and checks it."""

    task: TaskName = "sft"  # vae (an autoencoder), sft (supervised flow matching) or msgrpo (RL)
    seed: int = 0  # every random draw of the run derives from it (with the step and the sample)
    output: str = "runs/default"  # the run folder (see `uniref.training.rundir`)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)  # read by task vae only
    sft: SFTConfig = field(default_factory=SFTConfig)  # read by task sft only
    msgrpo: MSGRPOConfig = field(default_factory=MSGRPOConfig)  # read by task msgrpo only
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run."""
        if self.task == "vae":
            return self.vae.steps
        if self.task == "sft":
            return sum(s.steps for s in self.sft.stages)
        return sum(p.steps for p in self.msgrpo.phases)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self, errors: list[str]) -> None:
        """Appends every problem of the config to ``errors``: each section's own, then the rules that join
        sections (the task's model and the sections it reads)."""
        c = _Checks(errors)
        c.one_of(self.task, TaskName, "task", quote=True)
        c.int_at_least(self.seed, "seed", 0, MAX_SEED)
        c.need(isinstance(self.output, str) and bool(self.output), "output: must be a non-empty path")
        m = self.model
        sources = [k for k in ("preset", "pretrained", "qwen_image_edit") if getattr(m, k) is not None]
        if self.task == "vae":
            c.need(
                not sources, f"model: a vae task trains its own autoencoder (the vae section); remove model.{sources}"
            )
            c.need(
                self.data.source == "synthetic",
                "data.source: a vae task trains on the synthetic world's images; set data.source: synthetic",
            )
        else:
            c.need(
                len(sources) == 1,
                f"model: give exactly one of preset, pretrained, qwen_image_edit (got {sources or 'none'})",
            )
        if self.task == "msgrpo" and self.data.source != "synthetic":
            c.need(
                self.msgrpo.reward != "synthetic" or self.msgrpo.rewards is not None,
                "msgrpo.reward: the synthetic reward scores the synthetic world's tasks only; with data.source "
                f"{self.data.source!r} give a reward for its rows (module:function, called as fn(records, images))",
            )
        m.check(c)
        self.data.check(c)
        self.optim.check(c)
        self.deepspeed.check(c)
        if self.task == "vae":
            self.vae.check(c)
        elif self.task == "sft":
            self.sft.check(c)
            s, d = self.sft, self.data
            if m.qwen_image_edit is None and isinstance(s.token_budget, int) and isinstance(d.size, int):
                one_target = (d.size // 16) ** 2
                c.need(
                    s.token_budget >= 2 * one_target,
                    f"sft.token_budget: {s.token_budget} image tokens cannot hold one sample (a {d.size}px target "
                    f"alone is {one_target} tokens, plus references); raise it to at least {4 * one_target}",
                )
        elif self.task == "msgrpo":
            self.msgrpo.check(c)
            if self.deepspeed.micro_batches_per_step != 1:
                c.errors.append(
                    "deepspeed.micro_batches_per_step: MSGRPO accumulates over the trained timesteps of each rollout "
                    "batch by itself; leave it at 1"
                )
        self.checkpoint.check(c)
        self.log.check(c)

    def check_environment(self) -> None:
        """The checks that depend on this machine, run where the job starts (a config may name folders of
        another machine): the model folders exist and hold safetensors, and ``sft.token_budget`` fits this
        machine's memory for this model.

        Raises:
            ConfigError: listing every problem.
        """
        errors: list[str] = []
        c = _Checks(errors)
        self.model.check_files(c)
        if self.data.source != "synthetic":
            from uniref.data import DatasetError, open_dataset

            try:
                rows = len(open_dataset(self.data.source, self.data.root, self.data.keys, self.data.allow_outside_root))
                c.need(rows > 0, f"data.source {self.data.source}: the dataset has no rows")
            except DatasetError as exc:
                c.errors.append(f"data.source: {exc}")
        if self.task == "sft" and not errors:
            limit, why = _token_limit(self.model, self.deepspeed.bf16)
            if limit is not None:
                c.need(
                    self.sft.token_budget <= limit,
                    f"sft.token_budget: {self.sft.token_budget} tokens is over this machine's limit of {limit} for "
                    f"this model ({why}); lower it",
                )
        if errors:
            sep = "\n  " if len(errors) > 1 else " "
            raise ConfigError("invalid training config:" + sep + sep.join(errors))


def _token_limit(model: ModelConfig, bf16: bool) -> tuple[int | None, str]:
    """The most image tokens a micro-batch of ``model`` can hold here, and how that was derived: the
    backward pass keeps at least every block's input (blocks x width values per token), and all of it
    must fit this machine's memory (the GPU's, or the RAM without one)."""
    import os

    import torch

    geometry = model.geometry()
    if geometry is None:
        return None, ""
    layers, width = geometry
    if torch.cuda.is_available():  # this rank's GPU, by index: no CUDA context is created here
        device = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        memory, where = torch.cuda.get_device_properties(device).total_memory, "GPU memory"
    else:
        memory, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"
    per_token = layers * width * (2 if bf16 else 4)
    return memory // per_token, (
        f"{layers} blocks x {width} values x {2 if bf16 else 4} bytes kept per token "
        f"for the backward pass, {memory / 2**30:.0f} GiB of {where}"
    )


# --------------------------------------------------------------------------------------------
# Reading: YAML -> dict -> overrides -> dataclasses (typed), then the semantic checks
# --------------------------------------------------------------------------------------------


MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


def _yaml_loader():
    """A `yaml.SafeLoader` for configs: plain scalars, lists and mappings only.

    Aliases are refused (``*name`` expands without bound: a few lines can ask for billions of values) and
    so are more than `MAX_YAML_NODES` nodes; ``!!binary``, ``!!set``, ``!!omap``, ``!!pairs`` and
    ``!!timestamp`` values are not config values, and unquoted dates stay strings (then fail the type of
    their key, or are read as the path or name they were meant to be).
    """
    import yaml

    class ConfigLoader(yaml.SafeLoader):
        nodes = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    "aliases (*name) are not allowed in a config; write the value out",
                    self.peek_event().start_mark,
                )
            self.nodes += 1
            if self.nodes > MAX_YAML_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_YAML_NODES} values", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)

    def refuse(loader, node):
        raise yaml.constructor.ConstructorError(
            None, None, f"{node.tag.split(':')[-1]} values are not config values", node.start_mark
        )

    ConfigLoader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    for tag in ("binary", "set", "omap", "pairs", "timestamp"):
        ConfigLoader.add_constructor(f"tag:yaml.org,2002:{tag}", refuse)
    return ConfigLoader


def _read_yaml(text: str, where: str):
    """``text`` parsed by `_yaml_loader`.

    Raises:
        ConfigError: one line: ``where``, the line and column, and the problem.
    """
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({at}{problem})") from None


def _parse_value(text: str, item: str):
    return _read_yaml(text, f"override {item!r}") if text.strip() else ""


def _apply_override(tree: dict, item: str, errors: list[str]) -> None:
    if "=" not in item:
        errors.append(f"override {item!r}: expected key=value (e.g. optim.lr=3e-4)")
        return
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            errors.append(f"override {item!r}: {p} is not a section")
            return
        node = nxt
    try:
        node[parts[-1]] = _parse_value(value, item)
    except ConfigError as exc:
        errors.append(str(exc))


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(value, tp, where: str, errors: list[str]):
    """`value` as type `tp` (dataclass, list[...], X | None, int, float, bool, str, dict), else an error."""
    origin = typing.get_origin(tp)
    if origin is Literal:  # the type of its choices here; the section's check names the choices
        return _convert(value, type(typing.get_args(tp)[0]), where, errors)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where, errors)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{where}: must be a mapping of {tp.__name__} keys, got {value!r}")
            return tp()
        return _build(tp, value, where, errors)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            errors.append(f"{where}: must be a list, got {value!r}")
            return []
        return [_convert(v, inner, f"{where}[{i}]", errors) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: must be a mapping, got {value!r}")
            return {}
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{where}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{where}: must be an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{where}: must be a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{where}: must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")  # a bug in this module, not in a config


def _build(cls, values: dict, where: str, errors: list[str]):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            errors.append(f"{path}: unknown key{hint}")
            continue
        kwargs[key] = _convert(value, hints[key], path, errors)
    return cls(**kwargs)


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None
) -> TrainConfig:
    """Reads a YAML config (or ``base``), applies ``key=value`` overrides (values in YAML syntax) and validates
    it (`TrainConfig.check`; the folders it names are checked where the job starts, by
    `TrainConfig.check_environment`).

    Raises:
        ConfigError: listing every problem, each with its dotted key.
    """
    errors: list[str] = []
    tree: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file (shipped configs: training/configs/*.yaml)")
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError(f"--config {path}: {path.stat().st_size} bytes; a config is at most {MAX_YAML_BYTES}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"--config {path}: not UTF-8 text") from None
        loaded = _read_yaml(text, f"--config {path}")
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"--config {path}: the top level must be a mapping of sections, got {type(loaded).__name__}"
            )
        tree.update(loaded or {})
    tree = json.loads(json.dumps(tree))  # a deep copy that the overrides may change
    for item in overrides:
        _apply_override(tree, item, errors)
    cfg = _build(TrainConfig, tree, "", errors)
    if not errors:
        cfg.check(errors)
    if errors:
        where = f" in {path}" if path is not None else ""
        sep = "\n  " if len(errors) > 1 else " "
        raise ConfigError(f"invalid training config{where}:{sep}" + sep.join(errors))
    return cfg
