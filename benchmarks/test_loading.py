"""Peak host memory of loading a Qwen-Image transformer from sharded bf16 safetensors (diffusers' layout):
uniref's loader (meta-device model, shard by shard, tensor by tensor) vs the path it replaces (diffusers'
`QwenImageTransformer2DModel.from_pretrained`, then a second, fp32 model of ours with the state dict copied
in). Each load runs in a fresh child process that reports its resident-memory peak (VmHWM) above its
resident memory before the load; the ratio to the weights' bf16 bytes is the number that matters.

The geometry: ``UNIREF_LOADING_GEOMETRY`` = ``small`` (default, seconds), ``mid`` (the `mid` preset's
1.37B-parameter transformer) or ``large`` (3.5B, Qwen-Image's head dim, 23 blocks of width 2048; the old path
is not run there: it needs about 4x the weights and this machine has 24 GB). Results: benchmarks/results/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

GEOMETRIES = {
    "small": dict(
        num_layers=4, num_attention_heads=4, attention_head_dim=64, joint_attention_dim=256, axes_dims_rope=(8, 28, 28)
    ),
    "mid": dict(num_layers=16, num_attention_heads=12, attention_head_dim=128, joint_attention_dim=512),
    "large": dict(num_layers=23, num_attention_heads=16, attention_head_dim=128, joint_attention_dim=3584),
}
GEOMETRY = os.environ.get("UNIREF_LOADING_GEOMETRY", "small")
SHARD_BYTES = 2 * 2**30 if GEOMETRY != "small" else 4 * 2**20

CHILD = r"""
import json, sys, torch
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
import diffusers, uniref
from uniref.models.transformer import UniRefTransformer2DModel
path, how = sys.argv[1], sys.argv[2]
before = rss("VmRSS:")
if how == "uniref":
    model = UniRefTransformer2DModel.from_qwenimage(path, torch_dtype=torch.bfloat16)
else:  # the path before: diffusers' model, then ours built in fp32 and the state dict copied across
    src = diffusers.QwenImageTransformer2DModel.from_pretrained(path, torch_dtype=torch.bfloat16)
    model = UniRefTransformer2DModel(**{k: src.config[k] for k in ("patch_size", "in_channels", "out_channels",
        "num_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim", "axes_dims_rope")})
    model.load_state_dict(src.state_dict())
    model = model.to(torch.bfloat16)
print(json.dumps({"peak": rss("VmHWM:") - before, "params": sum(p.numel() for p in model.parameters())}))
"""


def write_random_qwen_folder(folder: Path, geometry: dict, shard_bytes: int) -> int:
    """A random-weight `QwenImageTransformer2DModel` folder in bf16 shards with their index, written one shard
    at a time (never the whole model in memory). Returns the weights' bytes."""
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import save_file

    config = dict(patch_size=2, in_channels=64, out_channels=16, **{"axes_dims_rope": (16, 56, 56), **geometry})
    with init_empty_weights():
        model = QwenImageTransformer2DModel(**config)
    shapes = {name: p.shape for name, p in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    groups, current, size = [], [], 0
    for name, shape in shapes.items():
        n = shape.numel() * 2
        if current and size + n > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    groups.append(current)
    weight_map, g, total = {}, torch.Generator().manual_seed(0), 0
    for i, names in enumerate(groups, start=1):
        file = f"diffusion_pytorch_model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=g) * 0.02).to(torch.bfloat16) for n in names}
        save_file(tensors, folder / file)
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({n: file for n in names})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return total


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen") / GEOMETRY
    return folder, write_random_qwen_folder(folder, GEOMETRIES[GEOMETRY], SHARD_BYTES)


_PEAKS: dict[str, float] = {}


def _peak(folder: Path, how: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), how], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("impl", ["diffusers_then_copy", "uniref"])
def test_load_peak_host_memory(benchmark, qwen_folder, impl):
    folder, weight_bytes = qwen_folder
    if impl != "uniref" and GEOMETRY == "large":
        pytest.skip("the old path needs about 4x the weights' bytes: more than this machine's 24 GB at 3.5B")
    benchmark.group = f"load a {GEOMETRY} Qwen-Image transformer (bf16 shards): peak host memory"
    result = benchmark.pedantic(_peak, args=(folder, impl), rounds=1, iterations=1)
    ratio = result["peak"] / weight_bytes
    _PEAKS[impl] = ratio
    benchmark.extra_info.update(
        params=result["params"], weight_bytes=weight_bytes, peak_bytes=result["peak"], peak_over_weights=round(ratio, 3)
    )
    if impl == "uniref" and "diffusers_then_copy" in _PEAKS:
        benchmark.extra_info["peak_vs_diffusers_then_copy"] = round(ratio / _PEAKS["diffusers_then_copy"], 3)
    print(
        f"\n{impl}: {result['params'] / 1e9:.2f}B parameters, weights {weight_bytes / 2**30:.2f} GiB, "
        f"peak {result['peak'] / 2**30:.2f} GiB = {ratio:.2f}x the weights"
    )
