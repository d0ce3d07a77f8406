"""What this uniref install was built with: `python -m uniref.info` or `uniref.info()`."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import torch

_OPTIONAL = ("triton", "flash_attn", "diffusers", "transformers", "deepspeed", "peft")


def _version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.metadata.version(name.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "installed"


def build_info() -> dict:
    """A dict describing the build: versions, compiled backends, CUDA archs and optional packages."""
    from uniref import _C, __version__

    return {
        "uniref": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension_cpu": True,
        "cpu_arch": _C.cpu_arch,
        "cpu_attention_kernels": _C.cpu_attention_target(),
        "extension_cuda": bool(_C.with_cuda),
        "cuda_archs": [a for a in _C.cuda_archs.split(";") if a],
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "optional": {name: _version(name) for name in _OPTIONAL},
    }


def info() -> dict:
    """Prints `build_info()` as an aligned table and returns it."""
    data = build_info()
    for key, value in data.items():
        if key == "optional":
            for name, ver in value.items():
                print(f"{'  ' + name:<16} {ver or 'not found'}")
        else:
            print(f"{key:<16} {value}")
    return data


if __name__ == "__main__":
    info()
