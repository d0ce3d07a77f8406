"""The training configuration: one validated dataclass tree, read from YAML plus ``key=value`` overrides.

Every mistake is caught before any work starts and reported in one `ConfigError` that lists each
problem with its dotted key (``sft.stages[1].pixel_budget: must be an int > 0, got -4``): unknown keys
(with the closest known one), wrong types, and impossible combinations (MSGRPO without a group, a
micro-batch count that does not divide among the ranks, LoRA on a frozen model, ...).

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


# --------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """Low-rank adapters (peft) on the transformer's attention and MLP projections; the rest is frozen."""

    rank: int = 64
    alpha: float = 128.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    )


@dataclass
class ModelConfig:
    """Where the pipeline comes from (exactly one of ``preset``, ``pretrained``, ``qwen_image_edit``).

    ``preset``: a random-weight geometry of `uniref.testing.CONFIGS` (tiny, small, mid) seeded by ``seed``;
    ``pretrained``: a local `UniRefEditPipeline.save_pretrained` folder, or ``default`` for the shipped model;
    ``qwen_image_edit``: a local diffusers ``QwenImageEditPlusPipeline`` folder (real-scale runs).
    ``overrides``: transformer config keys replacing the preset's (e.g. ``num_layers``).
    ``vae``: a trained `AutoencoderKL` folder (a ``task: vae`` run's ``final``) replacing the preset's VAE.
    """

    preset: str | None = None
    pretrained: str | None = None
    qwen_image_edit: str | None = None
    overrides: dict = field(default_factory=dict)
    vae: str | None = None
    train_text_encoder: bool = False
    gradient_checkpointing: bool = False
    attention_backend: str = "auto"
    lora: LoraConfig | None = None


@dataclass
class DataConfig:
    """The synthetic world's training stream (`uniref.synthetic.SyntheticEditDataset`, split "train").
    ``length``: cycle through this many items (a fixed, small set: overfitting checks) instead of an
    endless stream."""

    size: int = 64
    compose_ratio: float = 0.5
    num_refs: list[int] = field(default_factory=lambda: [2, 6])
    edit_kinds: list[str] | None = None
    length: int | None = None


@dataclass
class OptimConfig:
    """AdamW with linear warmup then a cosine (or constant) schedule; gradient-norm clipping."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.05
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class DeepSpeedConfig:
    """How DeepSpeed runs. ``micro_batches_per_step`` is the global number of packed micro-batches per
    optimizer step: each rank accumulates ``micro_batches_per_step / world_size`` of them, so a run
    on 1 or N processes sees the same global batch. ``config``: a DeepSpeed JSON used as given instead
    of the one generated from these keys (its accumulation must match)."""

    zero_stage: int = 2
    bf16: bool = False
    micro_batches_per_step: int = 1
    config: str | None = None


@dataclass
class VAEConfig:
    """``task: vae``: a diffusers `AutoencoderKL` trained to reconstruct the world's images (targets and
    references, resized to ``data.size``): MSE plus ``kl_weight`` x KL. Each block after the first halves
    the resolution. The export sets ``shift_factor`` / ``scaling_factor`` to the latents' mean and 1/std."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    latent_channels: int = 8
    layers_per_block: int = 1
    norm_num_groups: int = 8
    steps: int = 1000
    batch_size: int = 16
    kl_weight: float = 1e-6


@dataclass
class StageConfig:
    """One stage of the progressive schedule: the references' total pixel budget (SELF) and its steps."""

    pixel_budget: int = 0
    steps: int = 0


@dataclass
class SFTConfig:
    """Flow matching on the target tokens: x_t = (1 - t) x_0 + t eps, target eps - x_0, t logit-normal
    then shifted as the scheduler shifts it for the sample's target token count.

    ``change_weight`` (>= 0, default 0: off) adds that much loss weight to the target's latent cells whose
    pixels differ from the first reference's (for samples whose first reference has the target's size:
    the edited image, or a composition's background), so the loss is not dominated by the unchanged
    background that is most of every target."""

    stages: list[StageConfig] = field(default_factory=list)
    token_budget: int = 4096
    budget_mode: str = "global"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    text_dropout: float = 0.1
    change_weight: float = 0.0


@dataclass
class PhaseConfig:
    """One MSGRPO phase: its data (``compose``, ``edit`` or ``mixed``) and RL steps (paper: compose first)."""

    data: str = "compose"
    steps: int = 0
    num_refs: list[int] | None = None


@dataclass
class MSGRPOConfig:
    """Flow-GRPO on multi-reference rollouts (see `uniref.grpo`). ``minibatches``: optimizer steps per
    rollout batch (each on a slice of every rank's rollouts); with more than one, the PPO ratio moves
    away from 1 and the clip acts."""

    phases: list[PhaseConfig] = field(default_factory=list)
    prompts_per_step: int = 2
    group_size: int = 4
    prompt_pool: int | None = None
    num_steps: int = 10
    noise_level: float = 0.7
    kind: str = "sde"
    sde_window: list[int] | None = None
    cfg_scale: float = 1.0
    pixel_budget: int = 8192
    budget_mode: str = "global"
    reward: str = "synthetic"
    reward_weights: list[float] | None = None
    aggregate: str = "sum_then_normalize"
    adv_std: str = "group"
    adv_clip: float = 5.0
    clip_range: float = 1e-4
    kl_beta: float = 0.0
    minibatches: int = 1


@dataclass
class CheckpointConfig:
    every: int = 100
    keep_last: int = 3


@dataclass
class LogConfig:
    every: int = 1
    plot: bool = True
    progress: bool = True


@dataclass
class TrainConfig:
    task: str = "sft"
    seed: int = 0
    output: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    msgrpo: MSGRPOConfig = field(default_factory=MSGRPOConfig)
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


# --------------------------------------------------------------------------------------------
# Reading: YAML -> dict -> overrides -> dataclasses (typed), then the semantic checks
# --------------------------------------------------------------------------------------------


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text) if text.strip() else ""


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
    node[parts[-1]] = _parse_value(value)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(value, tp, where: str, errors: list[str]):
    """`value` as type `tp` (dataclass, list[...], X | None, int, float, bool, str, dict), else an error."""
    origin = typing.get_origin(tp)
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


def _check(cfg: TrainConfig, errors: list[str]) -> None:
    """The semantic rules: ranges, choices and combinations."""
    from uniref.synthetic import EDIT_KINDS
    from uniref.testing import CONFIGS

    def need(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    def positive_int(v, key: str, low: int = 1) -> None:
        need(isinstance(v, int) and not isinstance(v, bool) and v >= low, f"{key}: must be an int >= {low}, got {v!r}")

    def number(v, key: str, low: float, high: float = math.inf, strict: bool = False) -> None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (
            low < v if strict else low <= v) and v <= high
        need(ok, f"{key}: must be a finite number in {'(' if strict else '['}{low}, {high}], got {v!r}")

    need(cfg.task in ("vae", "sft", "msgrpo"), f"task: must be 'vae', 'sft' or 'msgrpo', got {cfg.task!r}")
    positive_int(cfg.seed, "seed", 0)
    need(isinstance(cfg.output, str) and bool(cfg.output), "output: must be a non-empty path")

    m = cfg.model
    sources = [k for k in ("preset", "pretrained", "qwen_image_edit") if getattr(m, k) is not None]
    if cfg.task == "vae":
        need(not sources, f"model: a vae task trains its own autoencoder (the vae section); remove model.{sources}")
    else:
        need(len(sources) == 1, f"model: give exactly one of preset, pretrained, qwen_image_edit (got {sources or 'none'})")
    if m.vae is not None:
        need(m.preset is not None, "model.vae: replaces a preset's VAE; a pretrained pipeline keeps its own")
    if m.preset is not None:
        need(m.preset in CONFIGS, f"model.preset: must be one of {tuple(CONFIGS)}, got {m.preset!r}")
    if m.overrides and m.preset is None:
        errors.append("model.overrides: only applies to a preset (a pretrained model keeps its saved config)")
    if m.train_text_encoder and m.qwen_image_edit is not None:
        errors.append("model.train_text_encoder: the Qwen2.5-VL encoder stays frozen; set it to false")
    if m.lora is not None:
        positive_int(m.lora.rank, "model.lora.rank")
        number(m.lora.alpha, "model.lora.alpha", 0.0, strict=True)
        number(m.lora.dropout, "model.lora.dropout", 0.0, 1.0)
        need(bool(m.lora.target_modules), "model.lora.target_modules: must name at least one module")
        if m.train_text_encoder:
            errors.append("model.lora: LoRA trains adapters on the transformer only; set model.train_text_encoder: false")
    from uniref.attention import BACKENDS

    need(m.attention_backend in ("auto", *BACKENDS), f"model.attention_backend: must be auto or one of {BACKENDS}")

    d = cfg.data
    positive_int(d.size, "data.size", 32)
    number(d.compose_ratio, "data.compose_ratio", 0.0, 1.0)
    need(len(d.num_refs) == 2 and 2 <= d.num_refs[0] <= d.num_refs[1] <= 6,
         f"data.num_refs: must be [min, max] within 2..6, got {d.num_refs!r}")
    if d.length is not None:
        positive_int(d.length, "data.length")
    if d.edit_kinds is not None:
        bad = [k for k in d.edit_kinds if k not in EDIT_KINDS]
        need(bool(d.edit_kinds) and not bad, f"data.edit_kinds: must be a non-empty subset of {EDIT_KINDS}, got {d.edit_kinds!r}")

    o = cfg.optim
    number(o.lr, "optim.lr", 0.0, strict=True)
    need(len(o.betas) == 2 and all(isinstance(b, float) and 0 <= b < 1 for b in o.betas),
         f"optim.betas: must be two numbers in [0, 1), got {o.betas!r}")
    number(o.weight_decay, "optim.weight_decay", 0.0)
    number(o.eps, "optim.eps", 0.0, strict=True)
    positive_int(o.warmup_steps, "optim.warmup_steps", 0)
    need(o.schedule in ("cosine", "constant"), f"optim.schedule: must be cosine or constant, got {o.schedule!r}")
    number(o.min_lr_ratio, "optim.min_lr_ratio", 0.0, 1.0)
    number(o.grad_clip, "optim.grad_clip", 0.0)

    ds = cfg.deepspeed
    need(ds.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage: must be 0, 1, 2 or 3, got {ds.zero_stage!r}")
    positive_int(ds.micro_batches_per_step, "deepspeed.micro_batches_per_step")
    if ds.config is not None and not Path(ds.config).is_file():
        errors.append(f"deepspeed.config: {ds.config} is not a file; give a DeepSpeed JSON or remove the key")

    if cfg.task == "vae":
        v = cfg.vae
        need(bool(v.block_out_channels) and all(isinstance(c, int) and c > 0 and c % v.norm_num_groups == 0
                                                for c in v.block_out_channels),
             f"vae.block_out_channels: must be positive multiples of vae.norm_num_groups={v.norm_num_groups}")
        positive_int(v.latent_channels, "vae.latent_channels")
        positive_int(v.layers_per_block, "vae.layers_per_block")
        positive_int(v.steps, "vae.steps")
        positive_int(v.batch_size, "vae.batch_size")
        number(v.kl_weight, "vae.kl_weight", 0.0)
    elif cfg.task == "sft":
        s = cfg.sft
        need(bool(s.stages), "sft.stages: give at least one {pixel_budget, steps} stage")
        for i, st in enumerate(s.stages):
            positive_int(st.pixel_budget, f"sft.stages[{i}].pixel_budget", 16 * 16)
            positive_int(st.steps, f"sft.stages[{i}].steps")
        positive_int(s.token_budget, "sft.token_budget", 1)
        need(s.budget_mode in ("global", "per_image"), f"sft.budget_mode: must be global or per_image, got {s.budget_mode!r}")
        number(s.logit_std, "sft.logit_std", 0.0, strict=True)
        number(s.logit_mean, "sft.logit_mean", -math.inf)
        number(s.text_dropout, "sft.text_dropout", 0.0, 1.0)
        number(s.change_weight, "sft.change_weight", 0.0)
        if m.qwen_image_edit is None and isinstance(s.token_budget, int) and isinstance(d.size, int):
            one_target = (d.size // 16) ** 2
            need(s.token_budget >= 2 * one_target,
                 f"sft.token_budget: {s.token_budget} image tokens cannot hold one sample (a {d.size}px target alone "
                 f"is {one_target} tokens, plus references); raise it to at least {4 * one_target}")
    else:
        r = cfg.msgrpo
        need(bool(r.phases), "msgrpo.phases: give at least one {data, steps} phase (paper: compose, then edit)")
        for i, ph in enumerate(r.phases):
            need(ph.data in ("compose", "edit", "mixed"), f"msgrpo.phases[{i}].data: must be compose, edit or mixed")
            positive_int(ph.steps, f"msgrpo.phases[{i}].steps")
            if ph.num_refs is not None:
                need(len(ph.num_refs) == 2 and 2 <= ph.num_refs[0] <= ph.num_refs[1] <= 6,
                     f"msgrpo.phases[{i}].num_refs: must be [min, max] within 2..6")
        positive_int(r.prompts_per_step, "msgrpo.prompts_per_step")
        positive_int(r.group_size, "msgrpo.group_size", 2)
        if r.prompt_pool is not None:
            positive_int(r.prompt_pool, "msgrpo.prompt_pool")
        positive_int(r.num_steps, "msgrpo.num_steps", 2)
        number(r.noise_level, "msgrpo.noise_level", 0.0, strict=True)
        need(r.kind in ("sde", "cps"), f"msgrpo.kind: must be sde or cps, got {r.kind!r}")
        if r.kind == "cps":
            number(r.noise_level, "msgrpo.noise_level (cps: sin(a pi / 2) must stay below 1)", 0.0, 0.99, strict=True)
        if r.sde_window is not None:
            ok = len(r.sde_window) == 2 and 0 <= r.sde_window[0] < r.sde_window[1] <= r.num_steps
            need(ok, f"msgrpo.sde_window: must be [start, stop) with 0 <= start < stop <= num_steps, got {r.sde_window!r}")
        number(r.cfg_scale, "msgrpo.cfg_scale", 1.0)
        positive_int(r.pixel_budget, "msgrpo.pixel_budget", 16 * 16)
        need(r.budget_mode in ("global", "per_image"), "msgrpo.budget_mode: must be global or per_image")
        need(r.reward == "synthetic" or ":" in r.reward,
             f"msgrpo.reward: must be 'synthetic' or 'module:function' returning (N, S) rewards, got {r.reward!r}")
        if r.reward_weights is not None:
            need(bool(r.reward_weights) and all(math.isfinite(w) for w in r.reward_weights),
                 "msgrpo.reward_weights: must be a non-empty list of finite numbers")
        need(r.aggregate in ("sum_then_normalize", "normalize_then_sum"),
             "msgrpo.aggregate: must be sum_then_normalize or normalize_then_sum")
        need(r.adv_std in ("group", "batch"), "msgrpo.adv_std: must be group or batch")
        number(r.adv_clip, "msgrpo.adv_clip", 0.0, strict=True)
        number(r.clip_range, "msgrpo.clip_range", 0.0)
        number(r.kl_beta, "msgrpo.kl_beta", 0.0)
        positive_int(r.minibatches, "msgrpo.minibatches")
        if ds.micro_batches_per_step != 1:
            errors.append(
                "deepspeed.micro_batches_per_step: MSGRPO accumulates over the trained timesteps of each rollout "
                "batch by itself; leave it at 1"
            )

    positive_int(cfg.checkpoint.every, "checkpoint.every")
    positive_int(cfg.checkpoint.keep_last, "checkpoint.keep_last")
    positive_int(cfg.log.every, "log.every")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None) -> TrainConfig:
    """Reads a YAML config (or ``base``), applies ``key=value`` overrides (values in YAML syntax) and validates.

    Raises:
        ConfigError: listing every problem, each with its dotted key.
    """
    import yaml

    errors: list[str] = []
    tree: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file (shipped configs: training/configs/*.yaml)")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path}: not valid YAML ({exc})") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        tree.update(loaded or {})
    tree = json.loads(json.dumps(tree))  # a deep copy that the overrides may change
    for item in overrides:
        _apply_override(tree, item, errors)
    cfg = _build(TrainConfig, tree, "", errors)
    if not errors:
        _check(cfg, errors)
    if errors:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"invalid training config{where}:\n  " + "\n  ".join(errors))
    return cfg
