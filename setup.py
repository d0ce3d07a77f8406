"""Builds uniref and its compiled ops, `uniref._C`.

Install with `pip install --no-build-isolation .` into an environment that already has torch: with
build isolation pip would compile against a freshly downloaded torch, not the one you run.

Environment switches:
  UNIREF_CUDA        auto (default: CUDA kernels when torch has CUDA and nvcc is found) | 0 | 1
  UNIREF_CUDA_ARCHS  SM versions to build for, e.g. "80;90" (default) or "90"
  UNIREF_CPU_ARCH    -march value for the C++ kernels (default: native, the machine that builds)
  MAX_JOBS           parallel compile jobs (ninja)
"""

import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    mode = os.environ.get("UNIREF_CUDA", "auto").strip().lower()
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if mode in ("0", "false", "off", "no"):
        return False
    if mode in ("1", "true", "on", "yes"):
        if not available:
            raise RuntimeError(
                "UNIREF_CUDA=1 but this torch has no CUDA "
                f"(torch.version.cuda={torch.version.cuda}) or nvcc was not found (CUDA_HOME={CUDA_HOME}); "
                "install a CUDA build of torch and the CUDA toolkit, or set UNIREF_CUDA=auto"
            )
        return True
    if mode != "auto":
        raise ValueError(f"UNIREF_CUDA must be auto, 0 or 1, got {mode!r}")
    return available


def _cuda_archs() -> list[str]:
    archs = [a.strip() for a in os.environ.get("UNIREF_CUDA_ARCHS", "80;90").replace(",", ";").split(";")]
    archs = [a for a in archs if a]
    if not archs or not all(a.rstrip("a").isdigit() for a in archs):
        raise ValueError(f"UNIREF_CUDA_ARCHS must look like '80;90', got {os.environ.get('UNIREF_CUDA_ARCHS')!r}")
    return archs


def _extension():
    with_cuda = _want_cuda()
    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*/*_cpu.cpp"))
    march = os.environ.get("UNIREF_CPU_ARCH", "native")
    cxx = ["-O3", "-fopenmp", f"-march={march}", "-fvisibility=hidden"]
    macros = []
    nvcc = []
    if with_cuda:
        archs = _cuda_archs()
        cpp += sorted(glob.glob("csrc/*/*_cuda.cpp"))
        cu = sorted(glob.glob("csrc/*/*.cu"))
        # BuildExtension reads the arch list from TORCH_CUDA_ARCH_LIST; keep it equal to ours.
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a[:-1]}.{a[-1]}" for a in (x.rstrip("a") for x in archs))
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        macros += [("UNIREF_WITH_CUDA", None), ("UNIREF_CUDA_ARCHS", f'"{";".join(archs)}"')]
        return CUDAExtension(
            "uniref._C",
            cpp + cu,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "uniref._C",
        cpp,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="uniref",
    version="0.1.0",
    description="Multi-reference image editing with diffusion transformers: SELF packing, varlen attention, MSGRPO",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["uniref", "uniref.*"]),
    # the embedded default model (a save_pretrained folder of safetensors and JSON configs)
    package_data={"uniref": ["assets/default_model/*.json", "assets/default_model/*/*.json",
                             "assets/default_model/*/*.safetensors"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.6", "numpy", "pillow", "safetensors", "diffusers>=0.35"],
    extras_require={
        "train": ["deepspeed", "peft", "pyyaml", "matplotlib"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton", "transformers",
                 "deepspeed", "peft", "pyyaml", "matplotlib", "httpx", "pyarrow"],
        "qwen": ["transformers"],
        "judge": ["httpx", "pyarrow"],
        "triton": ["triton"],
    },
    entry_points={"console_scripts": ["uniref=uniref.cli:main"]},
)
