"""The training config: validation, overrides, YAML reading and the generated DeepSpeed JSON."""

from __future__ import annotations

import json
import time
import typing
from pathlib import Path

import pytest
import yaml

from uniref.training import ConfigError, load_config
from uniref.training.trainer import deepspeed_config

from training_helpers import CONFIGS, MSGRPO, SFT, run, write


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.total_steps > 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"optim": {"lr": "fast"}}, "optim.lr: must be a number"),
        ({"optim": {"lrr": 1e-3}}, "optim.lrr: unknown key; did you mean 'lr'?"),
        ({"sft": {"stages": [{"pixel_budget": -4, "steps": 2}]}}, "sft.stages[0].pixel_budget: must be an int >= 256"),
        ({"sft": {"stages": []}}, "sft.stages: give at least one"),
        ({"sft": {"change_weight": -1.0}}, "sft.change_weight: must be"),
        ({"model": {"preset": "tiny", "pretrained": "x"}}, "model: give exactly one of"),
        ({"model": {"preset": "huge"}}, "model.preset: must be one of"),
        ({"model": {"preset": "tiny", "train_text_encoder": True, "lora": {"rank": 4}}}, "LoRA trains adapters"),
        ({"deepspeed": {"zero_stage": 4}}, "deepspeed.zero_stage: must be 0, 1, 2 or 3"),
        ({"sft": {"stages": [{"pixel_budget": 4096, "steps": 1}], "token_budget": 8}}, "cannot hold one sample"),
        ({"task": "rl"}, "task: must be 'vae', 'sft' or 'msgrpo'"),
        ({"checkpoint": {"keep_last": 0}}, "checkpoint.keep_last: must be an int >= 1"),
    ],
)
def test_config_errors_name_the_key(change, message):
    cfg = json.loads(json.dumps(SFT))
    for section, values in change.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section] = {**cfg[section], **values} if section != "model" else values
        else:
            cfg[section] = values
    with pytest.raises(ConfigError) as err:
        load_config(base=cfg)
    assert message in str(err.value)


def test_config_msgrpo_rules():
    bad = json.loads(json.dumps(MSGRPO))
    bad["msgrpo"].update(sde_window=[2, 9], group_size=1, kind="ode")
    bad["deepspeed"]["micro_batches_per_step"] = 2
    with pytest.raises(ConfigError) as err:
        load_config(base=bad)
    text = str(err.value)
    for expected in (
        "msgrpo.group_size: must be an int >= 2",
        "msgrpo.kind: must be sde or cps",
        "msgrpo.sde_window",
        "deepspeed.micro_batches_per_step: MSGRPO",
    ):
        assert expected in text
    assert text.count("\n") >= 4  # every problem at once, one per line


def test_overrides_and_yaml_errors(tmp_path):
    path = write(tmp_path, SFT)
    cfg = load_config(path, ["optim.lr=3e-4", "sft.token_budget=512", "model.gradient_checkpointing=true"])
    assert (cfg.optim.lr, cfg.sft.token_budget, cfg.model.gradient_checkpointing) == (3e-4, 512, True)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(path, ["optim.lr"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("task: [sft\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_deepspeed_json_is_generated_or_checked(tmp_path):
    cfg = load_config(base=SFT)
    ds = deepspeed_config(cfg, world=2)
    assert ds["gradient_accumulation_steps"] == 1 and ds["zero_optimization"]["stage"] == 2
    assert deepspeed_config(cfg, world=1)["gradient_accumulation_steps"] == 2
    with pytest.raises(ConfigError, match="does not divide among 3 processes"):
        deepspeed_config(cfg, world=3)
    explicit = tmp_path / "ds.json"
    explicit.write_text(json.dumps({"gradient_accumulation_steps": 5, "zero_optimization": {"stage": 1}}))
    cfg = load_config(base={**SFT, "deepspeed": {"config": str(explicit), "micro_batches_per_step": 2}})
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=5"):
        deepspeed_config(cfg, world=1)
    explicit.write_text(json.dumps({"zero_optimization": {"stage": 1}, "bf16": {"enabled": False}}))
    ds = deepspeed_config(cfg, world=1)
    assert ds["zero_optimization"]["stage"] == 1 and ds["gradient_accumulation_steps"] == 2


def test_zero_offload_keys():
    cfg = load_config(base={**SFT, "deepspeed": {"zero_stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu"}})
    zero = deepspeed_config(cfg, world=1)["zero_optimization"]
    assert zero == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
    }
    assert "offload_optimizer" not in deepspeed_config(load_config(base=SFT), world=1)["zero_optimization"]
    with pytest.raises(ConfigError, match="deepspeed.offload_param: needs zero_stage 3"):
        load_config(base={**SFT, "deepspeed": {"zero_stage": 2, "offload_param": "cpu"}})
    with pytest.raises(ConfigError, match="deepspeed.offload_optimizer: needs zero_stage >= 1"):
        load_config(base={**SFT, "deepspeed": {"zero_stage": 0, "offload_optimizer": "cpu"}})
    with pytest.raises(ConfigError, match="deepspeed.offload_optimizer"):
        load_config(base={**SFT, "deepspeed": {"offload_optimizer": "nvme"}})


def test_invalid_config_exits_2_before_any_work(tmp_path):
    path = write(tmp_path, {**SFT, "optim": {"lr": -1.0}})
    proc = run(path, tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert "optim.lr: must be a finite number" in proc.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2
# --------------------------------------------------------------------------------------------


def _one_line_error(tmp_path, text: str, *overrides: str) -> str:
    """Runs training/run.py on the YAML ``text``; asserts exit 2 with one line on stderr and returns it."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = run(path, tmp_path / "out", *overrides, check=False, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def test_yaml_dates_binary_and_bad_overrides_are_one_line_errors(tmp_path):
    base = yaml.safe_dump(SFT)
    assert "seed: must be an int, got '2024-01-01'" in _one_line_error(
        tmp_path, base.replace("seed: 3", "seed: 2024-01-01")
    )
    line = _one_line_error(tmp_path, base + "output: !!binary aGVsbG8=\n")
    assert "not valid YAML (line" in line and "binary values are not config values" in line
    line = _one_line_error(tmp_path, base, "optim.lr=[1")
    assert "override 'optim.lr=[1': not valid YAML" in line
    # an unquoted date in a string key is the string it was meant to be
    assert load_config(base={**SFT, "output": "runs/2024-01-01"}).output == "runs/2024-01-01"
    (tmp_path / "dated.yaml").write_text(base + "output: 2024-01-01\n")
    assert load_config(tmp_path / "dated.yaml").output == "2024-01-01"


def test_seed_is_bounded():
    with pytest.raises(ConfigError, match=r"seed: must be an int in \[0, 4294967295\], got 1000000"):
        load_config(base=SFT, overrides=[f"seed={10**26}"])
    assert load_config(base=SFT, overrides=[f"seed={2**32 - 1}"]).seed == 2**32 - 1


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 10):
        prev = chr(ord("a") + i - 1)
        name = chr(ord("a") + i)
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 10)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"not valid YAML \(line 2, column \d+: aliases \(\*name\) are not allowed"):
        load_config(bomb)
    assert time.perf_counter() - t0 < 5
    many = tmp_path / "many.yaml"
    many.write_text("x: [" + ", ".join(["1"] * 100_001) + "]\n")
    with pytest.raises(ConfigError, match="more than 100000 values"):
        load_config(many)


def _bin_only_pipeline(folder: Path) -> Path:
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "UniRefEditPipeline", "transformer": ["uniref", "UniRefTransformer2DModel"]})
    )
    (folder / "transformer" / "config.json").write_text("{}")
    (folder / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    return folder


def test_bin_only_model_folders_are_config_errors(tmp_path):
    pipe = _bin_only_pipeline(tmp_path / "pipe")
    cfg = load_config(base={**SFT, "model": {"pretrained": str(pipe)}})
    with pytest.raises(ConfigError, match=f"model.pretrained: {pipe / 'transformer'} holds only .bin weights"):
        cfg.check_environment()
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text("{}")
    (vae / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    cfg = load_config(base={**SFT, "model": {"preset": "tiny", "vae": str(vae)}})
    with pytest.raises(ConfigError, match=f"model.vae: {vae} holds only .bin weights"):
        cfg.check_environment()
    line = _one_line_error(tmp_path, yaml.safe_dump({**SFT, "model": {"pretrained": str(pipe)}}))
    assert "holds only .bin weights" in line


def test_token_budget_is_bounded_by_the_model_and_the_machine(tmp_path):
    cfg = load_config(base=SFT, overrides=["sft.token_budget=100000000000"])
    with pytest.raises(
        ConfigError,
        match=r"sft.token_budget: 100000000000 tokens is over this machine's limit of "
        r"\d+ for this model \(2 blocks x 32 values x 4 bytes",
    ):
        cfg.check_environment()
    load_config(base=SFT, overrides=["sft.token_budget=100000"]).check_environment()
    line = _one_line_error(tmp_path, yaml.safe_dump(SFT), "sft.token_budget=100000000000")
    assert "over this machine's limit of" in line


def test_every_config_field_is_documented_where_declared():
    import dataclasses
    import inspect

    from uniref.training import config

    undocumented = []
    for name, cls in inspect.getmembers(config, lambda c: dataclasses.is_dataclass(c) and isinstance(c, type)):
        lines = inspect.getsource(cls).splitlines()
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name]):
                continue  # a section: documented by its own class
            at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{f.name}:"))
            if "#" not in lines[at] and not lines[at - 1].strip().startswith("#"):
                undocumented.append(f"{name}.{f.name}")
    assert not undocumented


def test_choice_aliases_match_their_implementations():
    from uniref import packing
    from uniref.training.config import BudgetMode

    assert BudgetMode is packing.BudgetMode  # one list of choices, owned by the module that implements them
    for mode in typing.get_args(BudgetMode):
        assert packing.plan_reference_sizes([(64, 32)], 4096, mode=mode)
    from uniref import grpo
    from uniref.training import config, msgrpo

    assert (config.SdeKind, config.Aggregate, config.AdvStd) == (grpo.SdeKind, grpo.Aggregate, grpo.AdvStd)
    assert config.PhaseData is msgrpo.PhaseData
