"""Loading transformer weights straight from safetensors shards into a model built on the meta device.

A 20B model loaded the usual way exists twice on the host (a randomly initialized fp32 model, then the
checkpoint copied into it): about 2 x 80 GB per process. Here the model is built on the meta device (no
memory), every tensor's name, shape and dtype are checked against the shards' headers before anything is
read, and the shards are then read one at a time, each tensor converted to the requested dtype and moved
to the requested device as it is assigned. Peak host memory: the weights in their final dtype plus the
largest tensor in flight. Tensors are read with plain file reads into their own buffers rather than through
a memory map, whose resident pages would count a whole shard (up to 10 GB in diffusers' layout) on top.

Layouts read: one ``<weights_name>.safetensors`` file, or diffusers' sharded layout
``<weights_name>-0000x-of-0000y.safetensors`` with its ``<weights_name>.safetensors.index.json``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["WeightsError", "check_tensors", "load_into_meta_model", "safetensors_index"]

WEIGHTS_NAME = "diffusion_pytorch_model"


class WeightsError(ValueError):
    """A weights folder that does not fit the model: missing files or tensors, unexpected or mis-shaped tensors."""


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the JSON header


def _read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's tensor table ``{name: {dtype, shape, data_offsets}}`` and where its data starts."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise WeightsError(f"{path} is not a readable safetensors file (shorter than its 8-byte header size)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise WeightsError(f"{path} is not a readable safetensors file (header size {n} bytes)")
        try:
            table = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise WeightsError(f"{path} is not a readable safetensors file (its header is not JSON: {exc})") from exc
    if not isinstance(table, dict):
        raise WeightsError(f"{path} is not a readable safetensors file (its header is not a JSON object)")
    table.pop("__metadata__", None)
    size = path.stat().st_size
    for name, entry in table.items():
        try:
            begin, end = entry["data_offsets"]
            count = 1
            for d in entry["shape"]:
                count *= int(d)
            ok = entry["dtype"] in _DTYPES and 0 <= begin <= end <= size - 8 - n
            ok = ok and end - begin == count * _DTYPES[entry["dtype"]].itemsize
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise WeightsError(f"{path}: the header entry of tensor {name} is malformed or runs past the file's end")
    return table, 8 + n


def _read_tensor(f, entry: dict, data_start: int) -> torch.Tensor:
    begin, end = entry["data_offsets"]
    buf = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(data_start + begin)
    if f.readinto(memoryview(buf.numpy())) != end - begin:
        raise WeightsError(f"{f.name} is truncated")
    return buf.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def safetensors_index(folder: str | Path, weights_name: str = WEIGHTS_NAME) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every tensor of a weights folder: ``{name: (shard file, shape)}``, read from the shards' headers only.

    Raises:
        WeightsError: no weights (naming what was looked for), a shard the index names that is missing or
            unreadable, or a tensor the index places in a shard that does not hold it.
    """
    folder = Path(folder)
    index = folder / f"{weights_name}.safetensors.index.json"
    single = folder / f"{weights_name}.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise WeightsError(f"{index} is not a safetensors index (a JSON object with a weight_map): {exc}") from exc
        shards = sorted(set(weight_map.values()))
    elif single.is_file():
        weight_map, shards = None, [single.name]
    else:
        raise WeightsError(
            f"{folder} has no {single.name} and no {index.name}: not a saved model folder (only safetensors are read)"
        )
    out: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            raise WeightsError(f"{path} is missing: {index.name} names it as a shard")
        table, _ = _read_header(path)
        for name, entry in table.items():
            out[name] = (path, tuple(int(d) for d in entry["shape"]))
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in out or out[name][0].name != shard:
                raise WeightsError(f"{index.name} places {name} in {shard}, which does not hold it")
    return out


def check_tensors(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[Path, tuple[int, ...]]], what: str
) -> None:
    """Compares the tensors a model needs (``{name: shape}``) with those its files hold (`safetensors_index`).

    Raises:
        WeightsError: the first problem, naming the file and the tensor: a tensor ``what`` (e.g. "the
            QwenImageTransformer2DModel described by .../config.json") needs that no file holds, one no part of
            it, or a shape that differs.
    """
    missing = [k for k in expected if k not in found]
    if missing:
        files = ", ".join(sorted({str(f) for f, _ in found.values()}))
        raise WeightsError(
            f"{files}: tensor {missing[0]!r} is missing ({len(missing)} missing in all) but {what} "
            "needs it; the weights are incomplete or belong to another model"
        )
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        raise WeightsError(
            f"{found[unexpected[0]][0]}: tensor {unexpected[0]!r} is not part of {what} "
            f"({len(unexpected)} such tensors); the config does not match the weights (e.g. fewer layers)"
        )
    for name, want in expected.items():
        file, got = found[name]
        if tuple(got) != tuple(want):
            raise WeightsError(
                f"{file}: tensor {name!r} has shape {list(got)} but {what} expects {list(want)}; the "
                "config does not match the weights"
            )


def load_into_meta_model(
    model: nn.Module,
    folder: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    weights_name: str = WEIGHTS_NAME,
    rename: Mapping[str, str] | None = None,
) -> nn.Module:
    """Fills ``model`` (built on the meta device) with the tensors of ``folder``, shard by shard.

    Args:
        model: a module whose parameters and buffers are all on the meta device.
        folder: a weights folder (see the module docstring).
        dtype: the parameters' dtype (default: as stored); buffers keep their stored dtype.
        device: where the parameters go, tensor by tensor.
        rename: model name -> stored name, where they differ.

    Returns:
        ``model``, every tensor materialized, in eval mode.

    Raises:
        WeightsError: before anything is read, when a tensor is missing, unexpected or mis-shaped.
    """
    folder = Path(folder)
    rename = dict(rename or {})
    found = safetensors_index(folder, weights_name)
    expected = {rename.get(k, k): tuple(v.shape) for k, v in model.state_dict().items()}
    check_tensors(expected, found, f"the {type(model).__name__} of {folder}")
    stored_to_model = {rename.get(k, k): k for k in model.state_dict()}
    params = set(dict(model.named_parameters()))
    by_shard: dict[Path, list[str]] = {}
    for stored in stored_to_model:
        by_shard.setdefault(found[stored][0], []).append(stored)
    for shard, names in by_shard.items():
        table, data_start = _read_header(shard)
        with open(shard, "rb") as f:
            for stored in names:
                name = stored_to_model[stored]
                tensor = _read_tensor(f, table[stored], data_start)
                if dtype is not None and name in params and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                _assign(model, name, tensor.to(device), name in params)
    return model.eval()


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, is_param: bool) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if is_param:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = tensor
