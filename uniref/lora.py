"""LoRA files in the three formats people's tools load, and LoRA adapters on uniref's transformer.

Formats (detected from the keys when reading):

    diffusers  ``pytorch_lora_weights.safetensors``: ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight``,
               the PEFT config (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``) in the file's
               ``lora_adapter_metadata``; what ``QwenImageEditPlusPipeline.load_lora_weights`` reads (written
               by diffusers' own ``save_lora_weights``)
    peft       ``adapter_model.safetensors`` + ``adapter_config.json``: ``base_model.model.<module>.lora_A.weight``
    kohya      ComfyUI / kohya / musubi: ``lora_unet_<module with dots as underscores>.lora_down.weight``,
               ``.lora_up.weight`` and a scalar ``.alpha``

Module paths are those of diffusers' ``QwenImageTransformer2DModel``, which are ours. Every format keeps each
module's A (``(r, in)``), B (``(out, r)``) and alpha, so a conversion there and back is bitwise. Only
safetensors are read or written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "FORMATS",
    "LoraError",
    "LoraFormat",
    "LoraWeights",
    "adapter_weights",
    "convert_lora",
    "inject_lora",
    "merge_adapters",
    "read_lora",
    "tuner_layers",
    "write_lora",
]

LoraFormat = Literal["diffusers", "peft", "kohya"]
FORMATS: tuple[str, ...] = LoraFormat.__args__
FILE_NAMES = {
    "diffusers": "pytorch_lora_weights.safetensors",
    "peft": "adapter_model.safetensors",
    "kohya": "lora_kohya.safetensors",
}
_KOHYA_PREFIX = "lora_unet_"
_PEFT_PREFIX = "base_model.model."


class LoraError(ValueError):
    """A LoRA file or adapter that cannot be read, converted or applied; the message names the key or module."""


@dataclass
class LoraWeights:
    """One adapter: per module path, ``(A (r, in), B (out, r), alpha)``; the update is ``(alpha / r) B A``."""

    modules: dict[str, tuple[Tensor, Tensor, float]] = field(default_factory=dict)

    def config(self) -> dict:
        """The PEFT ``LoraConfig`` fields that describe these ranks and alphas."""
        ranks = {m: a.shape[0] for m, (a, _, _) in self.modules.items()}
        alphas = {m: alpha for m, (_, _, alpha) in self.modules.items()}
        r = max(ranks.values(), key=list(ranks.values()).count)  # the most common rank and alpha as defaults
        alpha = max(alphas.values(), key=list(alphas.values()).count)
        return {
            "r": r,
            "lora_alpha": alpha,
            "target_modules": sorted(self.modules),
            "rank_pattern": {m: v for m, v in ranks.items() if v != r},
            "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
        }


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _lora_file(path: Path, fmt: str | None = None) -> Path:
    if path.is_file():
        return path
    names = [FILE_NAMES[fmt]] if fmt else list(FILE_NAMES.values())
    for name in names:
        if (path / name).is_file():
            return path / name
    found = sorted(p.name for p in path.glob("*.safetensors")) if path.is_dir() else []
    if len(found) == 1:
        return path / found[0]
    raise LoraError(
        f"{path}: no LoRA safetensors file (looked for {', '.join(names)}"
        f"{'; found ' + ', '.join(found) if found else ''}); pass the file itself"
    )


def _module_from_kohya(name: str, known: dict[str, str]) -> str:
    """``transformer_blocks_3_attn_add_q_proj`` -> ``transformer_blocks.3.attn.add_q_proj`` (underscores in module
    names are ambiguous, so the known module paths of the architecture decide)."""
    m = re.fullmatch(r"transformer_blocks_(\d+)_(.+)", name)
    if m and m.group(2) in known:
        return f"transformer_blocks.{m.group(1)}.{known[m.group(2)]}"
    if name in known:
        return known[name]
    raise LoraError(f"kohya key {_KOHYA_PREFIX}{name}: no module of the Qwen-Image transformer is named so")


def _known_modules() -> dict[str, str]:
    """Underscored -> dotted paths of every Linear of a Qwen-Image transformer block (block index removed)
    and of the top level."""
    from accelerate import init_empty_weights

    from uniref.models.transformer import UniRefTransformer2DModel

    with init_empty_weights():
        model = UniRefTransformer2DModel(
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=1,
            joint_attention_dim=8,
            axes_dims_rope=(2, 2, 4),
            in_channels=4,
            out_channels=1,
        )
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            short = name.removeprefix("transformer_blocks.0.")
            out[short.replace(".", "_")] = short
    return out


def read_lora(path: str | Path) -> tuple[LoraWeights, LoraFormat]:
    """Reads a LoRA file (or a folder holding one) in any of the three formats: ``(weights, format)``.

    Raises:
        LoraError: not a LoRA file, keys of none of the formats (a few are listed), an A without its B, or
            shapes that do not pair.
    """
    from safetensors import SafetensorError, safe_open

    file = _lora_file(Path(path))
    try:
        with safe_open(str(file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except (OSError, SafetensorError) as exc:
        raise LoraError(f"{file} is not a readable safetensors file ({exc})") from exc
    keys = list(tensors)
    if keys and all(k.startswith(_KOHYA_PREFIX) for k in keys):
        fmt, known = "kohya", _known_modules()
        groups: dict[str, dict[str, Tensor]] = {}
        for k, v in tensors.items():
            stem, _, kind = k[len(_KOHYA_PREFIX) :].partition(".")
            groups.setdefault(stem, {})[kind] = v
        raw = {}
        for stem, g in groups.items():
            if "lora_down.weight" not in g or "lora_up.weight" not in g:
                raise LoraError(f"{file}: {_KOHYA_PREFIX}{stem} has {sorted(g)}, not lora_down.weight + lora_up.weight")
            rank = g["lora_down.weight"].shape[0]
            alpha = float(g["alpha"]) if "alpha" in g else float(rank)
            raw[_module_from_kohya(stem, known)] = (g["lora_down.weight"], g["lora_up.weight"], alpha)
        return _checked(LoraWeights(raw), file), fmt
    if keys and all(k.startswith("transformer.") for k in keys):
        fmt, prefix = "diffusers", "transformer."
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
        config = {k.removeprefix("transformer."): v for k, v in config.items()}
    elif keys and all(k.startswith(_PEFT_PREFIX) for k in keys):
        fmt, prefix = "peft", _PEFT_PREFIX
        config_file = file.parent / "adapter_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    else:
        raise LoraError(
            f"{file}: keys of no known LoRA format (diffusers 'transformer.*.lora_A.weight', peft "
            f"'base_model.model.*', kohya 'lora_unet_*'), e.g. {keys[:3]}"
        )
    pairs: dict[str, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        m = re.fullmatch(re.escape(prefix) + r"(.+)\.lora_([AB])(?:\.default)?\.weight", k)
        if m is None:
            raise LoraError(f"{file}: key {k} is not a LoRA A or B weight")
        pairs.setdefault(m.group(1), {})[m.group(2)] = v
    raw = {}
    for module, p in pairs.items():
        if set(p) != {"A", "B"}:
            raise LoraError(f"{file}: module {module} has lora_{''.join(sorted(p))} only")
        # without a config, alpha = rank (a scale of 1), as diffusers and peft read such files
        alpha = config.get("alpha_pattern", {}).get(module, config.get("lora_alpha", p["A"].shape[0]))
        raw[module] = (p["A"], p["B"], float(alpha))
    return _checked(LoraWeights(raw), file), fmt


def _checked(weights: LoraWeights, file: Path) -> LoraWeights:
    if not weights.modules:
        raise LoraError(f"{file} holds no LoRA weights")
    for module, (a, b, _) in weights.modules.items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraError(f"{file}: module {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, which do not pair")
    return weights


def write_lora(weights: LoraWeights, folder: str | Path, format: LoraFormat = "diffusers") -> Path:
    """Writes ``weights`` in ``format`` into ``folder`` (created); returns the file written."""
    from safetensors.torch import save_file

    if format not in FORMATS:
        raise LoraError(f"format must be one of {FORMATS}, got {format!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mods = weights.modules
    if format == "diffusers":
        from diffusers import QwenImageEditPlusPipeline

        layers = {}
        for m, (a, b, _) in mods.items():
            layers[f"{m}.lora_A.weight"], layers[f"{m}.lora_B.weight"] = a.contiguous(), b.contiguous()
        QwenImageEditPlusPipeline.save_lora_weights(
            folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=weights.config()
        )
    elif format == "peft":
        tensors = {}
        for m, (a, b, _) in mods.items():
            tensors[f"{_PEFT_PREFIX}{m}.lora_A.weight"], tensors[f"{_PEFT_PREFIX}{m}.lora_B.weight"] = (
                a.contiguous(),
                b.contiguous(),
            )
        save_file(tensors, folder / FILE_NAMES["peft"], metadata={"format": "pt"})
        config = {"peft_type": "LORA", "task_type": None, **weights.config()}
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    else:
        tensors = {}
        for m, (a, b, alpha) in mods.items():
            stem = _KOHYA_PREFIX + m.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = a.contiguous(), b.contiguous()
            tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        save_file(tensors, folder / FILE_NAMES["kohya"], metadata={"format": "pt"})
    return folder / FILE_NAMES[format]


def convert_lora(src: str | Path, dst: str | Path, to: LoraFormat) -> Path:
    """Converts a LoRA file of any format into ``to`` in folder ``dst``; returns the file written."""
    weights, _ = read_lora(src)
    return write_lora(weights, dst, to)


# --------------------------------------------------------------------------------------------
# Adapters on a model
# --------------------------------------------------------------------------------------------


def tuner_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Every PEFT tuner (adapter-carrying) layer of ``module``, by its path."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)}


def inject_lora(model: nn.Module, weights: LoraWeights, adapter_name: str = "default") -> nn.Module:
    """Adds ``weights`` to ``model`` as PEFT LoRA adapters (ranks and alphas per module, as stored).

    Raises:
        LoraError: a module the model does not have (a few are listed), or the first module whose A/B shapes
            do not fit the model's weight.
    """
    from peft import LoraConfig, inject_adapter_in_model

    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(set(weights.modules) - set(linears))
    if missing:
        raise LoraError(f"the LoRA targets {len(missing)} module(s) this model does not have, e.g. {missing[:3]}")
    for name, (a, b, _) in weights.modules.items():
        base = linears[name]
        if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
            raise LoraError(
                f"LoRA module {name}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit its weight "
                f"{tuple(base.weight.shape)} (a LoRA for another model size?)"
            )
    # full module paths as targets: peft matches a target name as a whole path suffix, so each hits one module
    inject_adapter_in_model(LoraConfig(**weights.config()), model, adapter_name=adapter_name)
    layers = tuner_layers(model)
    with torch.no_grad():
        for name, (a, b, _) in weights.modules.items():
            layer = layers[name]
            layer.lora_A[adapter_name].weight.copy_(a)
            layer.lora_B[adapter_name].weight.copy_(b)
    return model


def adapter_weights(model: nn.Module, adapter_name: str = "default") -> LoraWeights:
    """The LoRA adapters on ``model`` (as `inject_lora` or training put them there), as `LoraWeights`."""
    out = {}
    for name, layer in tuner_layers(model).items():
        if adapter_name in getattr(layer, "lora_A", {}):
            a = layer.lora_A[adapter_name].weight.detach().float().cpu()
            b = layer.lora_B[adapter_name].weight.detach().float().cpu()
            out[name] = (a, b, float(layer.lora_alpha[adapter_name]))
    if not out:
        raise LoraError(f"the model has no LoRA adapter named {adapter_name!r}")
    return LoraWeights(out)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merges every LoRA adapter into its base weight and puts the plain base layers back in place, so the
    model has its original architecture (and saves as such). A model without adapters is returned as is."""
    layers = tuner_layers(model)
    for layer in layers.values():
        layer.merge()
    by_id = {id(m) for m in layers.values()}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in by_id:
                setattr(parent, child_name, child.get_base_layer())
    return model
