"""Checks of a saved pipeline's weights against its configs, before anything is loaded.

diffusers loads a component whose file lacks a tensor with that tensor left on the meta device (or
randomly initialized), and drops tensors the config does not describe with a warning; both make a
broken folder look loadable. `check_component_weights` reads only the safetensors headers (names,
shapes) and compares them with the state dict of the model each ``config.json`` describes, built on the
meta device (no memory, no compute).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

__all__ = ["check_component_weights", "expected_state_shapes", "safetensors_shapes"]

_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def _error(message: str, corrupt: bool = False) -> Exception:
    from uniref.pipelines.edit import PipelineLoadError  # edit imports this module

    what = "a file is corrupt" if corrupt else "its files do not fit together"
    return PipelineLoadError(f"cannot load the pipeline, {what}: {message}")


def safetensors_shapes(folder: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """The tensors a component folder's weights hold, from the file headers only
    (`uniref.models.loading.safetensors_index`): ``{name: (file, shape)}``; ``{}`` when the folder has no
    weights (the loader reports that itself).

    Raises:
        PipelineLoadError: a header or index that cannot be read, naming the file.
    """
    from uniref.models.loading import WeightsError, safetensors_index

    if not any((folder / name).is_file() for name in (_WEIGHTS_NAME, f"{_WEIGHTS_NAME}.index.json")):
        return {}
    try:
        return safetensors_index(folder)
    except WeightsError as exc:
        raise _error(f"{exc}; re-save the pipeline", corrupt=True) from None


def expected_state_shapes(cls, folder: Path) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the state dict of ``cls`` built from ``folder/config.json`` on the meta device."""
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(folder))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_component_weights(path: Path) -> None:
    """Checks every model component of the pipeline folder ``path`` whose class is built from a
    ``config.json`` (diffusers' ``ConfigMixin`` models: the transformer, the VAE, the byte text encoder).

    Raises:
        PipelineLoadError: naming the file and the tensor, for a tensor the config expects that the file
            lacks, a tensor in the file that the config does not describe (e.g. a config with fewer layers
            than the weights), or a tensor whose shape differs from the config's.
    """
    from diffusers.configuration_utils import ConfigMixin

    spec = json.loads((path / "model_index.json").read_text())
    for name, entry in spec.items():
        if name.startswith("_") or not (isinstance(entry, list) and len(entry) == 2 and all(entry)):
            continue
        try:
            cls = getattr(importlib.import_module(entry[0]), entry[1])
        except (ImportError, AttributeError):
            continue  # the loader reports an unknown class with its own message
        folder = path / name
        if not (isinstance(cls, type) and issubclass(cls, ConfigMixin) and issubclass(cls, torch.nn.Module)):
            continue
        found = safetensors_shapes(folder)
        if not found:
            continue
        try:
            expected = expected_state_shapes(cls, folder)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            detail = " ".join(str(exc).split())[:300]
            raise _error(f"{folder / 'config.json'}: cannot build a {cls.__name__} from it ({detail})") from None
        _compare(found, expected, folder, cls.__name__)


def _compare(found: dict, expected: dict, folder: Path, cls_name: str) -> None:
    from uniref.models.loading import WeightsError, check_tensors

    try:
        check_tensors(expected, found, f"the {cls_name} described by {folder / 'config.json'}")
    except WeightsError as exc:
        raise _error(str(exc)) from None
