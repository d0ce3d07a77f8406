"""CPU-side checks of the CUDA varlen attention kernels (no GPU needed).

- The CI compile script picks up the kernel and binding files (it globs csrc/*/*.cu and
  csrc/*/*_cuda.cpp; setup.py does the same).
- The kernels themselves -- the real source in csrc/attention/*.cuh with the shipped tile
  configurations -- run on a CPU emulator of mma.sync / ldmatrix / cp.async / shuffles / barriers
  (tests/cuda_emu) against a float64 reference, fp16 and bf16, head dims 32/64/128: varlen batches
  with empty samples, partial tiles, strided inputs, negative and extreme scales, and garbage
  cu_seqlens (memory safety only). The numerical tests on a real GPU live in tests/test_attention*.py.
"""

import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTN = os.path.join(ROOT, "csrc", "attention")


def _cuda_include():
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for r in roots:
        if r and os.path.isfile(os.path.join(r, "include", "cuda_bf16.h")):
            return os.path.join(r, "include")
    return None


def test_compile_script_covers_attention_sources():
    cu = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*", "*.cu")))
    bindings = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*", "*_cuda.cpp")))
    assert "csrc/attention/varlen_attn_cuda_kernels.cu" in cu
    assert "csrc/attention/varlen_attn_cuda.cpp" in bindings
    script = open(os.path.join(ROOT, ".ci", "compile_cuda.sh")).read()
    assert "csrc/*/*.cu" in script and "csrc/*/*_cuda.cpp" in script
    # The kernel headers stay torch-free (nvcc alone compiles them in CI).
    for name in os.listdir(ATTN):
        if name.endswith((".cuh", ".cu")) or name in ("varlen_attn_launch.h", "varlen_attn_cuda_support.h"):
            text = open(os.path.join(ATTN, name)).read()
            assert "ATen" not in text and "torch/" not in text, name


def test_cuda_kernels_on_cpu_emulator(tmp_path):
    inc = _cuda_include()
    cxx = shutil.which("g++")
    if inc is None or cxx is None:
        pytest.skip("needs g++ and the CUDA toolkit headers (cuda_bf16.h)")
    exe = str(tmp_path / "emu_attention_test")
    build = subprocess.run(
        [
            cxx,
            "-std=c++20",
            "-O2",
            "-Wno-unknown-pragmas",
            "-I" + os.path.join(ROOT, "csrc"),
            "-I" + os.path.join(ROOT, "tests", "cuda_emu"),
            "-I" + inc,
            os.path.join(ROOT, "tests", "cuda_emu", "emu_attention_test.cpp"),
            "-o",
            exe,
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([exe, "quick"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    assert "all emulated kernel checks passed" in run.stdout
