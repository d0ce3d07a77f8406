"""The `uniref` command line and `uniref.info()`."""

import subprocess
import sys

import pytest

import uniref
from uniref.cli import main


def test_plan_demo_prints_plan_and_tokens(capsys):
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "mode=global" in out and "mode=per_image" in out
    assert "reference tokens" in out and "cu_seqlens [0," in out


def test_plan_custom_sizes(capsys):
    assert main(["plan", "--size", "512x512", "--size", "256x1024", "--budget", "262144", "--target", "512x512"]) == 0
    out = capsys.readouterr().out
    assert "2 reference(s)" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["plan", "--size", "100x100", "--budget", "100"], "pixel_budget=100 is too small"),
        (["plan", "--target", "500x512"], "multiples of 16"),
    ],
)
def test_plan_errors_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bad_size_syntax_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--size", "big"])
    assert exc.value.code == 2
    assert "HEIGHTxWIDTH" in capsys.readouterr().err


def test_info_reports_the_build(capsys):
    data = uniref.info()
    assert data["extension_cpu"] is True
    assert isinstance(data["extension_cuda"], bool)
    assert data["extension_cuda"] == bool(data["cuda_archs"])
    assert "triton" in data["optional"]
    assert "extension_cuda" in capsys.readouterr().out


def test_info_module_runs():
    result = subprocess.run([sys.executable, "-m", "uniref.info"], capture_output=True, text=True, check=True)
    assert "extension_cpu" in result.stdout


@pytest.mark.parametrize(
    "argv,message",
    [
        # 4 TB of RAM would be needed: above the limit of any machine that runs this
        (["plan", "--target", "1000000x1000000"], "--target: 1000000000000 pixels is above this machine's limit of "),
        (["plan", "--budget", str(10**14)], "--budget: 100000000000000 pixels is above this machine's limit of "),
    ],
)
def test_plan_sizes_are_bounded_before_anything_is_allocated(argv, message, capsys):
    from uniref.cli.plan import max_plan_pixels

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message + str(max_plan_pixels()) in err and len(err.strip().splitlines()) == 1
