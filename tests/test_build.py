"""The build itself (setup.py, CMakeLists.txt, .ci/compile_cuda.sh): portable by default, one C++ standard,
one version, a debug mode."""

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import uniref
from uniref import _C

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("uniref_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the flag logic; setup() runs only as __main__
    return module


def predefined_macros(flags: list[str]) -> set[str]:
    out = subprocess.run(["g++", *flags, "-dM", "-E", "-x", "c++", os.devnull], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    return {line.split()[1] for line in out.splitlines() if line.startswith("#define ")}


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("g++") is None, reason="x86-64 with g++")
def test_default_cpu_flags_are_portable(setup_py, monkeypatch):
    """Without UNIREF_CPU_ARCH the kernels target x86-64-v2: no AVX, which a machine of 2009 lacks (and an
    AVX-512 build dies with SIGILL on an AVX2 machine). `native` stays available as an opt-in."""
    monkeypatch.delenv("UNIREF_CPU_ARCH", raising=False)
    cxx, _ = setup_py.compile_flags(debug=False)
    assert "-march=native" not in cxx
    macros = predefined_macros([f for f in cxx if f.startswith(("-m", "-std"))])
    assert "__SSE4_2__" in macros
    assert not {"__AVX__", "__AVX2__", "__FMA__", "__AVX512F__"} & macros
    monkeypatch.setenv("UNIREF_CPU_ARCH", "native")
    assert "-march=native" in setup_py.compile_flags(debug=False)[0]
    monkeypatch.setenv("UNIREF_CPU_ARCH", "x86-64-v3; rm -rf /")
    with pytest.raises(ValueError, match="UNIREF_CPU_ARCH must be portable, native or a -march value"):
        setup_py.compile_flags(debug=False)


def test_portable_targets_per_machine(setup_py):
    assert setup_py.cpu_arch_flags("portable", "aarch64") == ["-march=armv8-a"]
    assert setup_py.cpu_arch_flags("portable", "x86_64") == ["-march=x86-64-v2", "-mtune=generic"]
    assert setup_py.cpu_arch_flags("portable", "riscv64") == []  # the compiler's own baseline
    assert setup_py.cpu_arch_flags("x86-64-v3", "x86_64") == ["-march=x86-64-v3"]


@pytest.mark.skipif(_C.cpu_arch != "portable", reason=f"this build opted into UNIREF_CPU_ARCH={_C.cpu_arch}")
@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None, reason="x86-64 objdump")
def test_portable_build_has_no_avx_instructions():
    """The extension as built: not one instruction on a 256- or 512-bit register; its x86-64-v3 build of the
    CPU attention kernels (loaded only on an AVX2 CPU) none on a 512-bit one."""
    from uniref import _C_x86_64_v3

    for module, register in ((_C, r"%[yz]mm\d"), (_C_x86_64_v3, r"%zmm\d")):
        text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", module.__file__], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
        wide = [line for line in text.splitlines() if re.search(register, line)]
        assert not wide, (module.__name__, wide[:5])


def test_debug_build_flags(setup_py, monkeypatch):
    cxx, nvcc = setup_py.compile_flags(debug=True)
    assert "-O0" in cxx and "-g" in cxx and "-O3" not in cxx
    assert "-G" in nvcc and "-O3" not in nvcc
    monkeypatch.setenv("DEBUG", "1")
    assert setup_py.compile_flags() == (cxx, nvcc)
    monkeypatch.setenv("DEBUG", "maybe")
    with pytest.raises(ValueError, match="DEBUG must be 0 or 1"):
        setup_py.compile_flags()


def test_one_cxx_standard(setup_py):
    std = setup_py.CXX_STANDARD
    assert std == "c++20"
    assert f"-std={std}" in setup_py.compile_flags(debug=False)[0] and f"-std={std}" in setup_py.compile_flags()[1]
    cmake = re.findall(r"set\(CMAKE_CXX_STANDARD (\d+)\)", (ROOT / "CMakeLists.txt").read_text())
    assert cmake == [std.removeprefix("c++")]
    for path in (".ci/compile_cuda.sh", "tests/cuda_emu/run.sh", "tests/test_attention_cuda_build.py"):
        found = set(re.findall(r"-std=(c\+\+\d+)", (ROOT / path).read_text()))
        assert found == {std}, (path, found)


def test_one_version(setup_py, tmp_path):
    assert setup_py.version() == uniref.__version__
    cmake_lists = (ROOT / "CMakeLists.txt").read_text()
    assert not re.search(r"project\([^)]*VERSION \d", cmake_lists)  # no second copy of the number
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed")
    # CMakeLists.txt's own two lines that read it, run as a script from the repository root.
    lines = [line for line in cmake_lists.splitlines() if "UNIREF_VERSION" in line and "project(" not in line]
    script = tmp_path / "version.cmake"
    script.write_text("\n".join(lines).replace("${CMAKE_CURRENT_SOURCE_DIR}", str(ROOT)) +
                      '\nmessage(STATUS "version=${UNIREF_VERSION}")\n')  # fmt: skip
    out = subprocess.run(["cmake", "-P", str(script)], capture_output=True, text=True, check=True).stdout
    assert f"version={uniref.__version__}" in out


# torch's CPU capability levels (ATEN_CPU_CAPABILITY) and the CPU attention kernels a portable build runs there.
TARGET_OF_CAPABILITY = {"default": "portable", "avx2": "x86-64-v3", "avx512": "x86-64-v4"}
DISPATCH_SCRIPT = """
import sys, torch, uniref
from uniref import _C
from uniref.testing.attention import make_varlen_inputs
q, k, v, cq, ck, mq, mk = make_varlen_inputs([300, 5, 130], [260, 90, 3], heads=3, head_dim=40)
leaves = [t.clone().requires_grad_() for t in (q, k, v)]
out = uniref.varlen_attention(*leaves, cq, ck, mq, mk, backend="cpu")
out.backward(torch.ones_like(out))
torch.save({"target": _C.cpu_attention_target(), "tensors": [out.detach()] + [t.grad for t in leaves]}, sys.argv[1])
"""


@pytest.mark.skipif(_C.cpu_arch != "portable", reason=f"this build opted into UNIREF_CPU_ARCH={_C.cpu_arch}")
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the wider builds are x86-64 ones")
def test_cpu_attention_runs_the_widest_build_the_cpu_runs(tmp_path):
    """A portable build carries the CPU attention kernels for x86-64-v3 and -v4 too, and runs the widest
    one the CPU has (torch's capability; ATEN_CPU_CAPABILITY lowers it): the same results, bitwise between
    the two FMA targets, within float32 rounding of the portable one (no FMA)."""
    import torch

    levels = list(TARGET_OF_CAPABILITY)
    capability = torch.backends.cpu.get_cpu_capability().lower()
    mine = next(level for level in reversed(levels) if capability.startswith(level))
    assert _C.cpu_attention_target() == TARGET_OF_CAPABILITY[mine]
    results = {}
    for capability in levels[: levels.index(mine) + 1]:
        path = tmp_path / f"{capability}.pt"
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
        subprocess.run([sys.executable, "-c", DISPATCH_SCRIPT, str(path)], env=env, check=True, timeout=300)
        results[capability] = torch.load(path, weights_only=True)
        assert results[capability]["target"] == TARGET_OF_CAPABILITY[capability]
    portable = results.pop("default")["tensors"]
    for result in results.values():
        for got, want in zip(result["tensors"], portable):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if "avx512" in results:
        for a, b in zip(results["avx2"]["tensors"], results["avx512"]["tensors"]):
            assert torch.equal(a, b)


def test_cpu_kernel_switch_refuses_anything_but_its_capsule():
    with pytest.raises(ValueError):
        _C._use_cpu_attention_kernels(object())
    before = _C.cpu_attention_target()
    _C._use_cpu_attention_kernels(None)  # back to the extension's own build
    try:
        assert _C.cpu_attention_target() == _C.cpu_arch
    finally:
        from uniref.ops.attention import _use_widest_cpu_kernels

        assert _use_widest_cpu_kernels() == before
