"""training/run.py end to end: real DeepSpeed (gloo on CPU) in subprocesses, as users launch it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from uniref.training import ConfigError, load_config
from uniref.training.checkpoint import find_checkpoint, list_checkpoints
from uniref.training.metrics import read_metrics
from uniref.training.trainer import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "training" / "run.py"
CONFIGS = sorted((ROOT / "training" / "configs").glob("*.yaml"))

SFT = {
    "task": "sft",
    "seed": 3,
    "model": {"preset": "tiny", "train_text_encoder": True},
    "data": {"size": 64, "num_refs": [2, 3]},
    "optim": {"lr": 2e-3, "weight_decay": 0.0, "schedule": "constant"},
    "deepspeed": {"zero_stage": 2, "micro_batches_per_step": 2},
    "sft": {"stages": [{"pixel_budget": 4096, "steps": 4}, {"pixel_budget": 8192, "steps": 4}], "token_budget": 160},
    "checkpoint": {"every": 2, "keep_last": 2},
    "log": {"progress": False, "plot": False},
}

MSGRPO = {
    "task": "msgrpo",
    "seed": 1,
    "model": {"preset": "tiny"},
    "data": {"size": 64, "num_refs": [2, 3]},
    "optim": {"lr": 1e-3, "weight_decay": 0.0, "schedule": "constant"},
    "deepspeed": {"zero_stage": 2},
    "msgrpo": {
        "phases": [{"data": "compose", "steps": 3}, {"data": "edit", "steps": 2}],
        "prompts_per_step": 2, "group_size": 4, "num_steps": 6, "sde_window": [1, 4], "pixel_budget": 8192,
    },
    "checkpoint": {"every": 5, "keep_last": 1},
    "log": {"progress": False, "plot": False},
}


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("RANK", None)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               DS_ACCELERATOR="cpu", **extra)
    return env


def _write(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cfg_path: Path, out: Path, *overrides: str, procs: int = 1, check: bool = True, timeout: int = 600,
         env: dict | None = None):
    if procs == 1:
        cmd = [sys.executable, str(RUN)]
    else:
        # the `deepspeed` launcher users run (its console script beside this interpreter when installed)
        launcher = Path(sys.executable).parent / "deepspeed"
        cmd = [str(launcher)] if launcher.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]
        cmd += ["--num_gpus", str(procs), "--master_port", str(29500 + os.getpid() % 1000), str(RUN)]
    cmd += ["--config", str(cfg_path), "--output", str(out), *overrides]
    proc = subprocess.run(cmd, env=_env(**(env or {})), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _weights(out: Path) -> dict[str, torch.Tensor]:
    w = load_file(out / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    w.update({f"text.{k}": v for k, v in load_file(out / "final" / "text_encoder" / "diffusion_pytorch_model.safetensors").items()})
    return w


def _metric(out: Path, key: str) -> list[float]:
    return [m[key] for m in read_metrics(out / "metrics.jsonl")]


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


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
    for expected in ("msgrpo.group_size: must be an int >= 2", "msgrpo.kind: must be sde or cps",
                     "msgrpo.sde_window", "deepspeed.micro_batches_per_step: MSGRPO"):
        assert expected in text
    assert text.count("\n") >= 4  # every problem at once, one per line


def test_overrides_and_yaml_errors(tmp_path):
    path = _write(tmp_path, SFT)
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


def test_invalid_config_exits_2_before_any_work(tmp_path):
    path = _write(tmp_path, {**SFT, "optim": {"lr": -1.0}})
    proc = _run(path, tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert "optim.lr: must be a finite number" in proc.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------------


def test_sft_loss_falls_on_a_tiny_overfit_set(tmp_path):
    cfg = {**SFT, "data": {"size": 64, "num_refs": [2, 3], "length": 4},
           "sft": {"stages": [{"pixel_budget": 4096, "steps": 60}], "token_budget": 160, "text_dropout": 0.0},
           "optim": {"lr": 3e-3, "weight_decay": 0.0, "schedule": "constant"},
           "checkpoint": {"every": 60, "keep_last": 1}}
    out = tmp_path / "out"
    _run(_write(tmp_path, cfg), out)
    loss = _metric(out, "loss")
    assert len(loss) == 60
    first, last = sum(loss[:8]) / 8, sum(loss[-8:]) / 8
    assert last < 0.6 * first, (first, last)


def test_msgrpo_raises_the_mean_reward(tmp_path):
    # a seeded learning test on a fixed pool of two prompts, with a two-source reward the random model
    # does not already maximize (tests/rl_rewards.py); the synthetic world's rewards need a trained VAE
    cfg = json.loads(json.dumps(MSGRPO))
    cfg["msgrpo"].update(phases=[{"data": "compose", "steps": 50}], prompt_pool=2, reward="rl_rewards:contrast",
                         group_size=8, sde_window=[0, 5], noise_level=1.0)
    cfg["optim"]["lr"] = 2e-2
    cfg["checkpoint"]["every"] = 50
    out = tmp_path / "out"
    _run(_write(tmp_path, cfg), out)
    reward = _metric(out, "reward/weighted")
    first, last = sum(reward[:10]) / 10, sum(reward[-10:]) / 10
    assert last > first + 0.03, (first, last)
    rows = read_metrics(out / "metrics.jsonl")
    for key in ("reward/red_left", "reward/green_top", "zero_std_fraction", "clip_fraction", "kl", "ratio_mean", "grad_norm"):
        assert all(key in r for r in rows), key


# --------------------------------------------------------------------------------------------
# Distribution and reliability
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["sft", "msgrpo"])
def test_two_process_zero2_matches_one_process(tmp_path, task):
    path = _write(tmp_path, SFT if task == "sft" else MSGRPO)
    one, two = tmp_path / "one", tmp_path / "two"
    shm_before = _shm_buffers()
    _run(path, one)
    _run(path, two, procs=2)
    assert _shm_buffers() == shm_before, "a run left shared-memory buffers behind in /dev/shm"
    key = "loss" if task == "sft" else "reward/weighted"
    if task == "sft":
        assert _metric(one, "samples") == _metric(two, "samples")  # the same global batches
    torch.testing.assert_close(torch.tensor(_metric(two, key)), torch.tensor(_metric(one, key)), rtol=1e-4, atol=1e-5)
    w1, w2 = _weights(one), _weights(two)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=2e-5, msg=k)


def _shm_buffers() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("deepspeed*")} if shm.is_dir() else set()  # other programs' files come and go


def test_runs_need_no_deepspeed_jit_op(tmp_path):
    # A DeepSpeed op JIT-built at process-group setup waits forever on a lock that a killed build left behind;
    # the trainer builds none, so a run with such a lock in its extensions folder still finishes.
    (tmp_path / "ext" / "deepspeed_shm_comm").mkdir(parents=True)
    (tmp_path / "ext" / "deepspeed_shm_comm" / "lock").touch()
    cfg = {**SFT, "sft": {**SFT["sft"], "stages": [{"pixel_budget": 4096, "steps": 1}]}}
    _run(_write(tmp_path, cfg), tmp_path / "out", timeout=120, env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert (tmp_path / "out" / "final").is_dir()


def test_killed_run_resumes_bitwise(tmp_path):
    stages = [{"pixel_budget": 4096, "steps": 8}, {"pixel_budget": 8192, "steps": 8}]
    path = _write(tmp_path, {**SFT, "sft": {**SFT["sft"], "stages": stages}})
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    _run(path, ref)
    cmd = [sys.executable, str(RUN), "--config", str(path), "--output", str(killed)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 300
    while not list_checkpoints(killed) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # into the next steps, maybe mid-way through writing the next checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = find_checkpoint("auto", killed)
    assert resumed_from is not None
    assert int(resumed_from.name.split("-")[1]) < 16, "the run finished before it was killed; nothing was tested"
    _run(path, killed, "--resume", "auto")
    w_ref, w_res = _weights(ref), _weights(killed)
    for k in w_ref:
        assert torch.equal(w_ref[k], w_res[k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in rows]  # noqa: E731
    assert strip(read_metrics(killed / "metrics.jsonl")) == strip(read_metrics(ref / "metrics.jsonl"))
    assert [p.name for p in list_checkpoints(killed)] == ["step-00000014", "step-00000016"]  # keep_last 2
    assert not list((killed / "checkpoints").glob(".tmp-*"))


def test_sft_loss_unit_and_gradient_checkpointing():
    """In-process: the loss is the velocity MSE on target tokens, and checkpointing changes nothing."""
    from uniref.presets import random_edit_pipeline
    from uniref.training.data import make_dataset, plan_micro_batches
    from uniref.training.modules import EditModel
    from uniref.training.sft import sft_loss

    cfg = load_config(base=SFT)
    data = make_dataset(cfg.data, cfg.seed)
    (batch,), cursor = plan_micro_batches(data, 5, 1, 4096, "global", 160)
    assert cursor == 5 + len(batch.items) and batch.tokens <= 160
    results = []
    for checkpointing in (False, True):
        pipe = random_edit_pipeline("tiny", seed=0)
        model = EditModel(pipe.transformer.train(), pipe.text_encoder, train_text_encoder=True)
        if checkpointing:
            pipe.transformer.enable_gradient_checkpointing()
        loss, stats = sft_loss(model, pipe, batch, cfg.sft, seed=0, step=7)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
        assert stats["samples"] == len(batch.items)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=0)
    assert sum(g is not None for g in results[0][1]) > 10
    for g0, g1 in zip(results[0][1], results[1][1]):
        assert (g0 is None) == (g1 is None)
        if g0 is not None:
            torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-7)
    again, _ = sft_loss(model, pipe, batch, cfg.sft, seed=0, step=7)  # keyed noise: the same loss again
    torch.testing.assert_close(again.detach(), results[1][0], rtol=1e-6, atol=0)


def test_change_weights_mark_the_changed_cells():
    from uniref.training.sft import change_weights

    ref = torch.randint(0, 256, (3, 64, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref[0, 40, 0] = 100
    target = ref.clone()
    target[1, 9:14, 30:33] += 100  # pixels of latent cells (rows 2-3, cols 7-8) at 4 px per cell
    target[0, 40, 0] = 105  # under the threshold: not a change
    w = change_weights(target, ref, (16, 12), 4.0)
    expected = torch.ones(16, 12)
    expected[2:4, 7:9] = 5.0
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(change_weights(target, ref[:, :32], (16, 12), 4.0), torch.ones(16, 12))
    torch.testing.assert_close(change_weights(target, ref, (16, 12), 0.0), torch.ones(16, 12))


def test_change_weighted_sft_loss():
    """Weighting changes the loss only through the changed cells: with every first reference equal to
    its target, the weighted loss is the plain one."""
    import dataclasses

    from uniref.presets import random_edit_pipeline
    from uniref.training.data import make_dataset, plan_micro_batches
    from uniref.training.modules import EditModel
    from uniref.training.sft import sft_loss

    cfg = load_config(base=SFT)
    (batch,), _ = plan_micro_batches(make_dataset(cfg.data, cfg.seed), 3, 1, 4096, "global", 400)
    pipe = random_edit_pipeline("tiny", seed=0)
    model = EditModel(pipe.transformer.eval(), pipe.text_encoder, train_text_encoder=True)
    weighted = dataclasses.replace(cfg.sft, change_weight=4.0)
    with torch.no_grad():
        plain = sft_loss(model, pipe, batch, cfg.sft, seed=0, step=1)[0]
        assert not torch.isclose(sft_loss(model, pipe, batch, weighted, seed=0, step=1)[0], plain, rtol=1e-3)
        same = dataclasses.replace(batch, items=[
            dataclasses.replace(it, references=[it.target, *it.references[1:]]) for it in batch.items
        ])
        torch.testing.assert_close(sft_loss(model, pipe, same, weighted, seed=0, step=1)[0],
                                   sft_loss(model, pipe, same, cfg.sft, seed=0, step=1)[0], rtol=1e-6, atol=0)


def test_bad_model_or_reward_is_a_clear_error(tmp_path):
    path = _write(tmp_path, {**SFT, "model": {"pretrained": str(tmp_path / "nope")}})
    proc = _run(path, tmp_path / "out", check=False)
    assert proc.returncode == 2 and "is not a saved pipeline folder" in proc.stderr
    bad_reward = json.loads(json.dumps(MSGRPO))
    bad_reward["msgrpo"]["reward"] = "no_such_module:fn"
    proc = _run(_write(tmp_path, bad_reward, "r.yaml"), tmp_path / "out", check=False)
    assert proc.returncode == 2 and "msgrpo.reward: cannot import" in proc.stderr


def test_resume_argument_errors(tmp_path):
    path = _write(tmp_path, SFT)
    proc = _run(path, tmp_path / "out", "--resume", str(tmp_path / "nowhere"), check=False)
    assert proc.returncode == 2 and "not a complete checkpoint" in proc.stderr
    partial = tmp_path / "out2" / "checkpoints" / ".tmp-step-00000002"
    partial.mkdir(parents=True)
    assert find_checkpoint("auto", tmp_path / "out2") is None  # a half-written checkpoint is never picked


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(tmp_path):
    cfg = {**SFT, "optim": {"lr": 1e30, "weight_decay": 0.0, "schedule": "constant", "grad_clip": 0.0},
           "checkpoint": {"every": 1, "keep_last": 5}}
    out = tmp_path / "out"
    proc = _run(_write(tmp_path, cfg), out, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "non-finite SFT loss at step" in proc.stderr and "last checkpoint is intact" in proc.stderr
    steps = [int(p.name.split("-")[1]) for p in list_checkpoints(out)]
    bad = json.loads(proc.stderr.split("non-finite SFT loss at step ")[1].split(" ")[0])
    assert steps and max(steps) == bad  # every step before the bad one was checkpointed; nothing after
    assert not (out / "final").exists()


def test_msgrpo_minibatches_move_the_ratio(tmp_path):
    cfg = json.loads(json.dumps(MSGRPO))
    cfg["msgrpo"].update(minibatches=2, phases=[{"data": "compose", "steps": 2}])
    cfg["optim"]["lr"] = 1e-2
    out = tmp_path / "out"
    _run(_write(tmp_path, cfg), out)
    rows = read_metrics(out / "metrics.jsonl")
    assert all(r["ratio_abs_dev_max"] > 0 for r in rows)  # the second minibatch sees a moved policy
    cfg["msgrpo"]["minibatches"] = 3  # 8 rollouts do not split in 3
    with pytest.raises(ConfigError, match="minibatches=3"):
        deepspeed_config(load_config(base=cfg), world=1)


def test_non_finite_rewards_stop_msgrpo(tmp_path):
    cfg = json.loads(json.dumps(MSGRPO))
    cfg["msgrpo"]["reward"] = "rl_rewards:nan_reward"
    proc = _run(_write(tmp_path, cfg), tmp_path / "out", check=False)
    assert proc.returncode == 1
    assert "non-finite reward" in proc.stderr


def test_lora_msgrpo_with_kl_trains_adapters_only_and_exports_a_plain_model(tmp_path):
    from uniref.pipelines import UniRefEditPipeline

    cfg = json.loads(json.dumps(MSGRPO))
    cfg["model"]["lora"] = {"rank": 4, "alpha": 8}
    cfg["msgrpo"].update(kl_beta=0.01, cfg_scale=2.0, kind="cps", noise_level=0.5)
    out = tmp_path / "out"
    _run(_write(tmp_path, cfg), out)
    assert all(r["kl"] >= 0 for r in read_metrics(out / "metrics.jsonl"))
    pipe = UniRefEditPipeline.from_pretrained(out / "final")
    assert not any("lora" in n for n, _ in pipe.transformer.named_parameters())
    from uniref.presets import random_edit_pipeline

    start = random_edit_pipeline("tiny", seed=1)
    changed = [n for n, p in pipe.transformer.named_parameters()
               if not torch.equal(p, dict(start.transformer.named_parameters())[n])]
    assert changed and all(any(t in n for t in ("to_q", "to_k", "to_v", "to_out", "add_")) for n in changed)


@pytest.mark.parametrize("stage, bf16", [(3, False), (1, True)])
def test_zero_stages_and_bf16_run_and_export(tmp_path, stage, bf16):
    from uniref.pipelines import UniRefEditPipeline

    cfg = {**SFT, "deepspeed": {"zero_stage": stage, "bf16": bf16, "micro_batches_per_step": 1},
           "sft": {"stages": [{"pixel_budget": 4096, "steps": 2}], "token_budget": 160},
           "checkpoint": {"every": 1, "keep_last": 1}}
    out = tmp_path / "out"
    _run(_write(tmp_path, cfg), out)
    _run(_write(tmp_path, {**cfg, "sft": {**cfg["sft"], "stages": [{"pixel_budget": 4096, "steps": 3}]}}, "more.yaml"),
         out, "--resume", "auto")
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    pipe = UniRefEditPipeline.from_pretrained(out / "final")
    image = pipe([Image_(64)], "make it blue", num_inference_steps=2, output_type="pt").images[0]
    assert torch.isfinite(image).all()


def Image_(size: int):
    from PIL import Image

    return Image.new("RGB", (size, size), (200, 30, 30))


def test_curves_png_is_written(tmp_path):
    cfg = {**SFT, "sft": {"stages": [{"pixel_budget": 4096, "steps": 2}], "token_budget": 160},
           "log": {"progress": True, "plot": True}}
    out = tmp_path / "out"
    _run(_write(tmp_path, cfg), out)
    from PIL import Image

    assert Image.open(out / "curves.png").size[0] > 100


def test_vae_task_learns_and_feeds_a_preset(tmp_path):
    from diffusers import AutoencoderKL

    cfg = load_config(ROOT / "training" / "configs" / "tiny_vae.yaml").to_dict()
    cfg["log"] = {"progress": False, "plot": False}
    out = tmp_path / "vae"
    _run(_write(tmp_path, cfg), out)
    mse = _metric(out, "mse")
    assert sum(mse[-5:]) / 5 < 0.5 * sum(mse[:5]) / 5, mse
    vae = AutoencoderKL.from_pretrained(out / "final")
    assert vae.config.scaling_factor != 1.0 and vae.config.latent_channels == 4
    sft = {**SFT, "model": {"preset": "tiny", "vae": str(out / "final"), "train_text_encoder": True},
           "sft": {"stages": [{"pixel_budget": 4096, "steps": 2}], "token_budget": 400}}
    _run(_write(tmp_path, sft, "sft.yaml"), tmp_path / "sft")
    assert json.loads((tmp_path / "sft" / "final" / "vae" / "config.json").read_text())["block_out_channels"] == [16, 32, 32]
    bad = {**sft, "model": {**sft["model"], "vae": str(tmp_path)}}
    proc = _run(_write(tmp_path, bad, "bad.yaml"), tmp_path / "bad", check=False)
    assert proc.returncode == 2 and "is not a saved AutoencoderKL folder" in proc.stderr
