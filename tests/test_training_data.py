"""Training on a dataset on disk (`data.source`): SFT over a DiffSynth-Studio metadata file ends with the same
weights as SFT over the synthetic stream with the same rows and seed; bad rows stop the run or are skipped
and logged, never dropped silently."""

import json

import torch

from uniref.training import load_config
from uniref.training.data import make_dataset

from training_helpers import SFT, run, weights, write

N = 6


def _config(**data):
    cfg = json.loads(json.dumps(SFT))
    cfg["data"].update(length=N, **data)
    cfg["sft"]["stages"] = [{"pixel_budget": 4096, "steps": 2}, {"pixel_budget": 8192, "steps": 2}]
    cfg["checkpoint"] = {"every": 10, "keep_last": 1}
    return cfg


def _write_diffsynth(folder, items) -> list[dict]:
    """The synthetic stream's items as a DiffSynth-Studio dataset: PNG files and a metadata file."""
    from PIL import Image

    (folder / "img").mkdir(parents=True)
    rows = []
    for i, item in enumerate(items):
        save = lambda t, name: Image.fromarray(t.permute(1, 2, 0).numpy()).save(folder / name) or name  # noqa: E731
        refs = [save(r, f"img/{i}_{k}.png") for k, r in enumerate(item["references"])]
        rows.append({"image": save(item["target"], f"img/{i}.png"), "edit_image": refs, "prompt": item["prompt"]})
    (folder / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_sft_on_a_diffsynth_dataset_equals_sft_on_the_same_synthetic_rows(tmp_path):
    synthetic = _config()
    stream = make_dataset(load_config(base=synthetic).data, synthetic["seed"])
    _write_diffsynth(tmp_path / "data", [stream[i] for i in range(N)])
    run(write(tmp_path, synthetic), tmp_path / "synthetic")
    on_disk = _config(source=f"diffsynth:{tmp_path / 'data' / 'meta.jsonl'}")
    run(write(tmp_path, on_disk, "disk.yaml"), tmp_path / "disk")
    a, b = weights(tmp_path / "synthetic"), weights(tmp_path / "disk")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # PNG is lossless: bitwise


def test_bad_rows_stop_the_run_or_are_skipped_and_logged(tmp_path):
    stream = make_dataset(load_config(base=_config()).data, SFT["seed"])
    rows = _write_diffsynth(tmp_path / "data", [stream[i] for i in range(N)])
    rows[1]["edit_image"][0] = "img/missing.png"
    rows[3]["image"] = None  # no target: an SFT row needs one
    (tmp_path / "data" / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = f"diffsynth:{tmp_path / 'data' / 'meta.jsonl'}"
    proc = run(write(tmp_path, _config(source=source)), tmp_path / "stop", check=False)
    assert proc.returncode == 2 and "missing.png: no such file" in proc.stderr and "id 1" in proc.stderr
    run(write(tmp_path, _config(source=source, on_bad_row="skip"), "skip.yaml"), tmp_path / "skip")
    skipped = [json.loads(x) for x in (tmp_path / "skip" / "skipped_rows.jsonl").read_text().splitlines()]
    assert {s["row"] for s in skipped} == {1, 3}
    assert any("no target image" in s["reason"] for s in skipped)
    proc = run(
        write(tmp_path, _config(source=f"diffsynth:{tmp_path / 'nope.jsonl'}"), "nope.yaml"),
        tmp_path / "nope",
        check=False,
    )
    assert proc.returncode == 2 and "data.source" in proc.stderr and "does not exist" in proc.stderr


def test_msgrpo_over_a_diffsynth_dataset_with_a_module_reward(tmp_path):
    """Rollout prompts and references come from the dataset's rows (their targets unused); the reward
    receives the rows and the decoded outputs: ``reward(records, images)``."""
    from uniref.training.metrics import read_metrics

    from training_helpers import MSGRPO

    stream = make_dataset(load_config(base=_config()).data, SFT["seed"])
    _write_diffsynth(tmp_path / "data", [stream[i] for i in range(N)])
    cfg = json.loads(json.dumps(MSGRPO))
    cfg["data"]["source"] = f"diffsynth:{tmp_path / 'data' / 'meta.jsonl'}"
    cfg["msgrpo"].update(phases=[{"data": "compose", "steps": 2}], reward="rl_rewards:records_seen")
    run(write(tmp_path, cfg), tmp_path / "out")
    metrics = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert len(metrics) == 2 and all(m["reward/from_a_row"] == 1.0 for m in metrics)
    cfg["msgrpo"]["reward"] = "synthetic"
    proc = run(write(tmp_path, cfg, "synthetic_reward.yaml"), tmp_path / "bad", check=False)
    assert proc.returncode == 2 and "the synthetic reward scores the synthetic world's tasks only" in proc.stderr
