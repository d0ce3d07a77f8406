"""Builds uniref and its compiled ops, `uniref._C`.

Install with `pip install --no-build-isolation .` into an environment that already has torch: with
build isolation pip would compile against a freshly downloaded torch, not the one you run.

Environment switches:
  UNIREF_CUDA        auto (default: CUDA kernels when torch has CUDA and nvcc is found) | 0 | 1
  UNIREF_CUDA_ARCHS  SM versions to build for, e.g. "80;90" (default) or "90"
  UNIREF_CPU_ARCH    the C++ kernels' target: portable (default: x86-64-v2 on x86-64, armv8-a on aarch64,
                     so the build runs on any machine of its architecture), native (the machine that builds,
                     e.g. AVX-512: faster, but SIGILL elsewhere) or any other -march value (x86-64-v3)
  DEBUG              1: -O0 -g (host) and -G (device) instead of -O3
  MAX_JOBS           parallel compile jobs (ninja)
"""

import glob
import os
import platform
import re

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
# The C++ standard of every compile (the torch headers need C++20); CMakeLists.txt and
# .ci/compile_cuda.sh use the same one (tests/test_build.py checks).
CXX_STANDARD = "c++20"
# -march of UNIREF_CPU_ARCH=portable per machine: the oldest ISA level that distributions still ship for.
PORTABLE_ARCH = {"x86_64": ["-march=x86-64-v2", "-mtune=generic"], "aarch64": ["-march=armv8-a"]}
# Beside a portable build, the CPU attention kernels alone for these wider targets, each its own module
# (uniref._C_x86_64_v3, ...); the widest one the CPU runs is used (csrc/attention/varlen_attn_cpu_dispatch.h).
# Measured on an AVX-512 machine: the portable kernels run ~3x slower than the x86-64-v4 ones.
SIMD_TARGETS = {"x86_64": ("x86-64-v3", "x86-64-v4")}


def version() -> str:
    """uniref.__version__, read from uniref/__init__.py (its one home; CMakeLists.txt reads it there too)."""
    text = open(os.path.join(ROOT, "uniref", "__init__.py"), encoding="utf-8").read()
    match = re.search(r'^__version__ = "([^"]+)"$', text, flags=re.M)
    if match is None:
        raise RuntimeError('uniref/__init__.py has no line __version__ = "X.Y.Z"')
    return match.group(1)


def cpu_arch_flags(value: str | None = None, machine: str | None = None) -> list[str]:
    """The target flags of the C++ kernels for UNIREF_CPU_ARCH (default portable) on `machine`."""
    value = (os.environ.get("UNIREF_CPU_ARCH", "portable") if value is None else value).strip() or "portable"
    if value == "portable":
        # Another architecture: the compiler's own default target, which is that architecture's baseline.
        return list(PORTABLE_ARCH.get(machine or platform.machine(), []))
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", value):
        raise ValueError(f"UNIREF_CPU_ARCH must be portable, native or a -march value such as x86-64-v3, got {value!r}")
    return [f"-march={value}"]


def simd_targets(machine: str | None = None) -> list[str]:
    """The wider targets built beside the main extension: only for UNIREF_CPU_ARCH=portable."""
    if (os.environ.get("UNIREF_CPU_ARCH", "").strip() or "portable") != "portable":
        return []
    return list(SIMD_TARGETS.get(machine or platform.machine(), ()))


def debug_build() -> bool:
    mode = os.environ.get("DEBUG", "0").strip().lower()
    if mode not in ("0", "1", "", "false", "true", "off", "on", "no", "yes"):
        raise ValueError(f"DEBUG must be 0 or 1, got {mode!r}")
    return mode in ("1", "true", "on", "yes")


def compile_flags(debug: bool | None = None) -> tuple[list[str], list[str]]:
    """(C++ flags, nvcc flags) of every source; DEBUG=1 trades -O3 for -O0 -g (and nvcc's -G)."""
    debug = debug_build() if debug is None else debug
    std = f"-std={CXX_STANDARD}"
    arch = cpu_arch_flags()
    if debug:
        return [std, "-O0", "-g", "-UNDEBUG", "-fopenmp", *arch, "-fvisibility=hidden"], [std, "-O0", "-G", "-g"]
    # -ffp-contract=fast: the kernels' sums round alike in their vector and scalar forms (csrc/attention).
    cxx = [std, "-O3", "-ffp-contract=fast", "-fopenmp", *arch, "-fvisibility=hidden"]
    return cxx, [std, "-O3", "-lineinfo"]


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
    cxx, nvcc = compile_flags()
    arch = os.environ.get("UNIREF_CPU_ARCH", "").strip() or "portable"
    macros = [("UNIREF_CPU_ARCH", f'"{arch}"')]
    if with_cuda:
        archs = _cuda_archs()
        cpp += sorted(glob.glob("csrc/*/*_cuda.cpp"))
        cu = sorted(glob.glob("csrc/*/*.cu"))
        # BuildExtension reads the arch list from TORCH_CUDA_ARCH_LIST; keep it equal to ours.
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a[:-1]}.{a[-1]}" for a in (x.rstrip("a") for x in archs))
        nvcc += ["--expt-relaxed-constexpr"] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
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


def _simd_extensions():
    # (One source for every target: they share its object file, so each build recompiles them all, ~20 s.)
    cxx, _ = compile_flags()
    common = [f for f in cxx if not f.startswith(("-march=", "-mtune="))]
    return [
        CppExtension(
            f"uniref._C_{target.replace('-', '_')}",
            ["csrc/attention/varlen_attn_cpu_simd.cpp"],
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("UNIREF_CPU_ARCH", f'"{target}"')],
            extra_compile_args={"cxx": [*common, f"-march={target}", "-mtune=generic"]},
            extra_link_args=["-fopenmp"],
        )
        for target in simd_targets()
    ]


# Guarded so that tests can import the flag logic; pip (setuptools.build_meta) runs this file as __main__.
if __name__ == "__main__":
    setup(
        name="uniref",
        version=version(),
        description="Multi-reference image editing with diffusion transformers: SELF packing, varlen attention, MSGRPO",
        long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        packages=find_packages(include=["uniref", "uniref.*"]),
        # the embedded default model (a save_pretrained folder of safetensors and JSON configs)
        package_data={
            "uniref": [
                "assets/default_model/*.json",
                "assets/default_model/*/*.json",
                "assets/default_model/*/*.safetensors",
            ]
        },
        ext_modules=[_extension(), *_simd_extensions()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        install_requires=["torch>=2.6", "numpy", "pillow", "safetensors", "diffusers>=0.35", "accelerate"],
        extras_require={
            "train": ["deepspeed", "peft", "pyyaml", "matplotlib"],
            # the web demo (`uniref demo`); pandas comes with Gradio
            "demo": ["gradio>=6.0"],
            # Hugging Face datasets as a training source (hf:PATH); build test tables from Arrow (see tests)
            "data": ["datasets>=5.2"],
            # the demo's tests drive Debian's chromium + chromium-driver (apt) through Selenium
            "test": [
                "pytest",
                "pytest-benchmark",
                "hypothesis",
                "triton",
                "transformers",
                "deepspeed",
                "peft",
                "pyyaml",
                "matplotlib",
                "gradio>=6.0",
                "selenium>=4.11",
                "datasets>=5.2",
                "ruff",
                "httpx",
                "pyarrow",
            ],
            "qwen": ["transformers"],
            # reward judges served behind an OpenAI-compatible endpoint; benchmark copies in parquet
            "judge": ["httpx", "pyarrow"],
            "triton": ["triton"],
        },
        entry_points={"console_scripts": ["uniref=uniref.cli:main"]},
    )
