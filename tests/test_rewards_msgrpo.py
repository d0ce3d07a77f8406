"""MSGRPO end to end (training/run.py, real DeepSpeed on CPU) with its reward from a served VLM judge: the
judge is a real chat-completions server on 127.0.0.1, reached through the `module:function` reward spec."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from uniref.testing.judge_server import JudgeServer
from uniref.training.metrics import read_metrics

from training_helpers import MSGRPO

pytest.importorskip("deepspeed")
pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[1]

REWARD_MODULE = """
import os
from uniref import rewards

judge = rewards.load("vlm_judge", base_url=os.environ["UNIREF_TEST_JUDGE_URL"], model="test-judge",
                     max_concurrency=16, retries=1, backoff=0.05, timeout=30)
"""

# the training tests' MSGRPO run, shorter, scored by the judge
CFG = json.loads(json.dumps(MSGRPO))
CFG["msgrpo"].update(
    phases=[{"data": "compose", "steps": 2}], group_size=2, num_steps=4, sde_window=[1, 3], reward="judge_reward:judge"
)


def _run(tmp_path: Path, mode: str, server: JudgeServer, config: dict | None = None):
    (tmp_path / "judge_reward.py").write_text(REWARD_MODULE)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config or CFG))
    env = dict(os.environ)
    env.pop("RANK", None)
    env.update(
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        UNIREF_TEST_JUDGE_URL=server.url(mode),
        PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]),
    )
    cmd = [sys.executable, str(ROOT / "training" / "run.py"), "--config", str(cfg), "--output", str(tmp_path / "out")]
    return subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_msgrpo_trains_on_a_served_judge(tmp_path):
    with JudgeServer() as server:
        proc = _run(tmp_path, "ok", server)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
        assert len(rows) == 2
        for name in ("instruction", "consistency_mean", "consistency_min", "quality"):
            assert all(0 <= r[f"reward/{name}"] <= 1 for r in rows)
        # 2 steps x 4 rollouts, each: instruction + one question per reference (2-3) + quality
        assert 2 * 4 * 4 <= server.requests <= 2 * 4 * 5


def test_msgrpo_stops_with_the_judges_url_when_it_stays_down(tmp_path):
    with JudgeServer() as server:
        proc = _run(tmp_path, "fail", server)
    assert proc.returncode != 0
    assert f"{server.url('fail')}/chat/completions" in proc.stderr and "HTTP 500" in proc.stderr
    assert not (tmp_path / "out" / "final").exists()


def test_msgrpo_rewards_list_with_weights_and_group_filter(tmp_path):
    """``msgrpo.rewards``: the served judge and the synthetic world's exact reward side by side, each source's
    axes named ``<source>/<axis>`` with its weights, and Edit-R1's group filter logging what it dropped."""
    cfg = yaml.safe_load(yaml.safe_dump(CFG))
    del cfg["msgrpo"]["reward"]
    cfg["msgrpo"]["rewards"] = [
        {
            "name": "vlm_judge",
            "weight": 0.5,
            "args": {
                "base_url": "JUDGE",
                "model": "test-judge",
                "retries": 1,
                "backoff": 0.05,
                "timeout": 30,
                "max_concurrency": 16,
            },
        },
        {"name": "synthetic", "weight": [1.0, 0.5, 0.5]},
    ]
    cfg["msgrpo"]["group_filter"] = [0.05, 0.9]
    with JudgeServer() as server:
        cfg["msgrpo"]["rewards"][0]["args"]["base_url"] = server.url("ok")
        proc = _run(tmp_path, "ok", server, cfg)
        assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert len(rows) == 2
    assert all("reward/vlm_judge/quality" in r and "reward/synthetic/integration" in r for r in rows)
    assert all(0.0 <= r["group_filter/dropped"] <= 1.0 for r in rows)
    from uniref.training import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"msgrpo.rewards\[0\]: must be \{name, weight, args\}"):
        load_config(base={**cfg, "msgrpo": {**cfg["msgrpo"], "rewards": [{"name": "nope"}]}})
    with pytest.raises(ConfigError, match="msgrpo.rewards replaces msgrpo.reward"):
        load_config(base={**cfg, "msgrpo": {**cfg["msgrpo"], "reward": "judge_reward:judge"}})
