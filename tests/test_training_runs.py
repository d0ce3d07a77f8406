"""training/run.py end to end: real DeepSpeed (gloo on CPU) in subprocesses, as users launch it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from uniref.training import ConfigError, load_config
from uniref.training.metrics import read_metrics
from uniref.training.trainer import deepspeed_config

from training_helpers import MSGRPO, ROOT, SFT, metric, run, weights, write


def test_sft_loss_falls_on_a_tiny_overfit_set(tmp_path):
    cfg = {
        **SFT,
        "data": {"size": 64, "num_refs": [2, 3], "length": 4},
        "sft": {"stages": [{"pixel_budget": 4096, "steps": 60}], "token_budget": 160, "text_dropout": 0.0},
        "optim": {"lr": 3e-3, "weight_decay": 0.0, "schedule": "constant"},
        "checkpoint": {"every": 60, "keep_last": 1},
    }
    out = tmp_path / "out"
    run(write(tmp_path, cfg), out)
    loss = metric(out, "loss")
    assert len(loss) == 60
    first, last = sum(loss[:8]) / 8, sum(loss[-8:]) / 8
    assert last < 0.6 * first, (first, last)


def test_msgrpo_raises_the_mean_reward(tmp_path):
    # a seeded learning test on a fixed pool of two prompts, with a two-source reward the random model
    # does not already maximize (tests/rl_rewards.py); the synthetic world's rewards need a trained VAE
    cfg = json.loads(json.dumps(MSGRPO))
    cfg["msgrpo"].update(
        phases=[{"data": "compose", "steps": 50}],
        prompt_pool=2,
        reward="rl_rewards:contrast",
        group_size=8,
        sde_window=[0, 5],
        noise_level=1.0,
    )
    cfg["optim"]["lr"] = 2e-2
    cfg["checkpoint"]["every"] = 50
    out = tmp_path / "out"
    run(write(tmp_path, cfg), out)
    reward = metric(out, "reward/weighted")
    first, last = sum(reward[:10]) / 10, sum(reward[-10:]) / 10
    assert last > first + 0.03, (first, last)
    rows = read_metrics(out / "metrics.jsonl")
    for key in (
        "reward/red_left",
        "reward/green_top",
        "zero_std_fraction",
        "clip_fraction",
        "kl",
        "ratio_mean",
        "grad_norm",
    ):
        assert all(key in r for r in rows), key


@pytest.mark.parametrize("task", ["sft", "msgrpo"])
def test_two_process_zero2_matches_one_process(tmp_path, task):
    path = write(tmp_path, SFT if task == "sft" else MSGRPO)
    one, two = tmp_path / "one", tmp_path / "two"
    shm_before = _shm_buffers()
    run(path, one)
    run(path, two, procs=2)
    assert _shm_buffers() == shm_before, "a run left shared-memory buffers behind in /dev/shm"
    key = "loss" if task == "sft" else "reward/weighted"
    if task == "sft":
        assert metric(one, "samples") == metric(two, "samples")  # the same global batches
    torch.testing.assert_close(torch.tensor(metric(two, key)), torch.tensor(metric(one, key)), rtol=1e-4, atol=1e-5)
    w1, w2 = weights(one), weights(two)
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
    run(write(tmp_path, cfg), tmp_path / "out", timeout=120, env_extra={"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert (tmp_path / "out" / "final").is_dir()


def test_bad_model_or_reward_is_a_clear_error(tmp_path):
    path = write(tmp_path, {**SFT, "model": {"pretrained": str(tmp_path / "nope")}})
    proc = run(path, tmp_path / "out", check=False)
    assert proc.returncode == 2 and "is not a saved pipeline folder" in proc.stderr
    bad_reward = json.loads(json.dumps(MSGRPO))
    bad_reward["msgrpo"]["reward"] = "no_such_module:fn"
    proc = run(write(tmp_path, bad_reward, "r.yaml"), tmp_path / "out", check=False)
    assert proc.returncode == 2 and "msgrpo.reward: cannot import" in proc.stderr


def test_msgrpo_minibatches_move_the_ratio(tmp_path):
    cfg = json.loads(json.dumps(MSGRPO))
    cfg["msgrpo"].update(minibatches=2, phases=[{"data": "compose", "steps": 2}])
    cfg["optim"]["lr"] = 1e-2
    out = tmp_path / "out"
    run(write(tmp_path, cfg), out)
    rows = read_metrics(out / "metrics.jsonl")
    assert all(r["ratio_abs_dev_max"] > 0 for r in rows)  # the second minibatch sees a moved policy
    cfg["msgrpo"]["minibatches"] = 3  # 8 rollouts do not split in 3
    with pytest.raises(ConfigError, match="minibatches=3"):
        deepspeed_config(load_config(base=cfg), world=1)


def test_non_finite_rewards_stop_msgrpo(tmp_path):
    cfg = json.loads(json.dumps(MSGRPO))
    cfg["msgrpo"]["reward"] = "rl_rewards:nan_reward"
    proc = run(write(tmp_path, cfg), tmp_path / "out", check=False)
    assert proc.returncode == 1
    assert "non-finite reward" in proc.stderr


def test_lora_msgrpo_with_kl_trains_adapters_only_and_exports_a_plain_model(tmp_path):
    from uniref.pipelines import UniRefEditPipeline

    cfg = json.loads(json.dumps(MSGRPO))
    cfg["model"]["lora"] = {"rank": 4, "alpha": 8}
    cfg["msgrpo"].update(kl_beta=0.01, cfg_scale=2.0, kind="cps", noise_level=0.5)
    out = tmp_path / "out"
    run(write(tmp_path, cfg), out)
    assert all(r["kl"] >= 0 for r in read_metrics(out / "metrics.jsonl"))
    pipe = UniRefEditPipeline.from_pretrained(out / "final")
    assert not any("lora" in n for n, _ in pipe.transformer.named_parameters())
    from uniref.presets import random_edit_pipeline

    start = random_edit_pipeline("tiny", seed=1)
    changed = [
        n
        for n, p in pipe.transformer.named_parameters()
        if not torch.equal(p, dict(start.transformer.named_parameters())[n])
    ]
    assert changed and all(any(t in n for t in ("to_q", "to_k", "to_v", "to_out", "add_")) for n in changed)


def test_lora_run_exports_its_adapters_that_reproduce_the_merged_model_and_start_a_new_run(tmp_path):
    """final/lora/ holds the adapters alone in every requested format; applied to the starting model they
    give the exported (merged) model; ``model.lora.init`` starts a further run from them."""
    from uniref.lora import read_lora
    from uniref.pipelines import UniRefEditPipeline
    from uniref.presets import random_edit_pipeline

    cfg = json.loads(json.dumps(MSGRPO))
    cfg["model"]["lora"] = {"rank": 4, "alpha": 8, "export": ["diffusers", "kohya", "peft"]}
    cfg["msgrpo"]["phases"] = [{"data": "compose", "steps": 2}]
    out = tmp_path / "out"
    run(write(tmp_path, cfg), out)
    files = sorted(p.name for p in (out / "final" / "lora").iterdir())
    assert files == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "lora_kohya.safetensors",
        "pytorch_lora_weights.safetensors",
    ]
    weights, fmt = read_lora(out / "final" / "lora" / "lora_kohya.safetensors")
    assert fmt == "kohya" and {w[0].shape[0] for w in weights.modules.values()} == {4}
    merged = UniRefEditPipeline.from_pretrained(out / "final").transformer
    start = random_edit_pipeline("tiny", seed=1).transformer.load_lora(out / "final" / "lora", merge=True)
    for (name, a), (_, b) in zip(sorted(merged.state_dict().items()), sorted(start.state_dict().items())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    again = json.loads(json.dumps(cfg))
    again["model"]["lora"] = {"init": str(out / "final" / "lora" / "lora_kohya.safetensors")}
    run(write(tmp_path, again, "again.yaml"), tmp_path / "again")
    bad = json.loads(json.dumps(cfg))
    bad["model"]["lora"] = {"init": str(tmp_path / "nope.safetensors"), "export": ["ckpt"]}
    proc = run(write(tmp_path, bad, "bad.yaml"), tmp_path / "bad", check=False)
    assert proc.returncode == 2 and "model.lora.export: ['ckpt'] are not LoRA formats" in proc.stderr


def test_lora_on_a_float8_base_trains_and_exports_a_plain_model(tmp_path):
    from uniref.pipelines import UniRefEditPipeline

    cfg = json.loads(json.dumps(MSGRPO))
    cfg["model"].update(lora={"rank": 4, "alpha": 8}, base_dtype="float8_e4m3fn")
    cfg["msgrpo"]["phases"] = [{"data": "compose", "steps": 2}]
    run(write(tmp_path, cfg), tmp_path / "out")
    pipe = UniRefEditPipeline.from_pretrained(tmp_path / "out" / "final")
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float32}
    assert not any("lora" in n for n, _ in pipe.transformer.named_parameters())
    bad = json.loads(json.dumps(cfg))
    del bad["model"]["lora"]
    proc = run(write(tmp_path, bad, "bad.yaml"), tmp_path / "bad", check=False)
    assert proc.returncode == 2 and "model.base_dtype: an 8-bit base is frozen, so it needs model.lora" in proc.stderr


@pytest.mark.parametrize("stage, bf16", [(3, False), (1, True)])
def test_zero_stages_and_bf16_run_and_export(tmp_path, stage, bf16):
    from uniref.pipelines import UniRefEditPipeline

    cfg = {
        **SFT,
        "deepspeed": {"zero_stage": stage, "bf16": bf16, "micro_batches_per_step": 1},
        "sft": {"stages": [{"pixel_budget": 4096, "steps": 2}], "token_budget": 160},
        "checkpoint": {"every": 1, "keep_last": 1},
    }
    out = tmp_path / "out"
    run(write(tmp_path, cfg), out)
    run(
        write(tmp_path, {**cfg, "sft": {**cfg["sft"], "stages": [{"pixel_budget": 4096, "steps": 3}]}}, "more.yaml"),
        out,
        "--resume",
        "auto",
    )
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    pipe = UniRefEditPipeline.from_pretrained(out / "final")
    image = pipe([Image_(64)], "make it blue", num_inference_steps=2, output_type="pt").images[0]
    assert torch.isfinite(image).all()


def Image_(size: int):
    from PIL import Image

    return Image.new("RGB", (size, size), (200, 30, 30))


def test_curves_png_is_written(tmp_path):
    cfg = {
        **SFT,
        "sft": {"stages": [{"pixel_budget": 4096, "steps": 2}], "token_budget": 160},
        "log": {"progress": True, "plot": True},
    }
    out = tmp_path / "out"
    run(write(tmp_path, cfg), out)
    from PIL import Image

    assert Image.open(out / "curves.png").size[0] > 100


def test_vae_task_learns_and_feeds_a_preset(tmp_path):
    from diffusers import AutoencoderKL

    cfg = load_config(ROOT / "training" / "configs" / "tiny_vae.yaml").to_dict()
    cfg["log"] = {"progress": False, "plot": False}
    out = tmp_path / "vae"
    run(write(tmp_path, cfg), out)
    mse = metric(out, "mse")
    assert sum(mse[-5:]) / 5 < 0.5 * sum(mse[:5]) / 5, mse
    vae = AutoencoderKL.from_pretrained(out / "final")
    assert vae.config.scaling_factor != 1.0 and vae.config.latent_channels == 4
    sft = {
        **SFT,
        "model": {"preset": "tiny", "vae": str(out / "final"), "train_text_encoder": True},
        "sft": {"stages": [{"pixel_budget": 4096, "steps": 2}], "token_budget": 400},
    }
    run(write(tmp_path, sft, "sft.yaml"), tmp_path / "sft")
    vae_config = json.loads((tmp_path / "sft" / "final" / "vae" / "config.json").read_text())
    assert vae_config["block_out_channels"] == [16, 32, 32]
    bad = {**sft, "model": {**sft["model"], "vae": str(tmp_path)}}
    proc = run(write(tmp_path, bad, "bad.yaml"), tmp_path / "bad", check=False)
    assert proc.returncode == 2 and "is not a saved AutoencoderKL folder" in proc.stderr
