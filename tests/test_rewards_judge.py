"""The served VLM judge against a real HTTP server on 127.0.0.1 (uniref.testing.judge_server)."""

import math
import time

import numpy as np
import pytest
import torch
from PIL import Image

from uniref import rewards
from uniref.rewards.prompts import JudgeReplyError, parse_score, yes_probability
from uniref.testing.judge_server import JudgeServer, expected_score

pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def server():
    with JudgeServer(slow_s=2.0) as s:
        yield s


def _batch(n=3, refs=2, size=16):
    g = torch.Generator().manual_seed(0)
    records = [
        rewards.Record(
            f"put the objects of the {refs} images on a table ({i})",
            [Image.new("RGB", (size, size + j), (40 * i, 20 * j, 90)) for j in range(refs)],
        )
        for i in range(n)
    ]
    return records, torch.rand(n, 3, size, size, generator=g)


def test_scores_are_the_servers_and_shaped_per_axis(server, tmp_path):
    judge = rewards.load("vlm_judge", base_url=server.url("ok"), model="judge-7b", retries=0)
    assert judge.names == ("instruction", "consistency_mean", "consistency_min", "quality")
    records, images = _batch()
    before = server.requests
    out = judge(records, images)
    assert out.shape == (3, 4) and out.dtype == torch.float32
    assert server.requests - before == 3 * (1 + 2 + 1)
    # the server's own score for each request, min'ed with the 10 it adds, over 10
    bodies = server.bodies[before:]
    by_text = {}
    for b in bodies:
        by_text.setdefault(b["messages"][0]["content"][-1]["text"], []).append(min(expected_score(b), 10) / 10)
    quality = sorted(v for t, vs in by_text.items() if "naturalness" in t for v in vs)
    assert sorted(out[:, 3].tolist()) == pytest.approx(quality)
    assert (out[:, 1] >= out[:, 2]).all()  # mean >= min
    body = bodies[0]
    assert body["model"] == "judge-7b"
    parts = body["messages"][0]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,") and parts[-1]["type"] == "text"


def test_cache_makes_rescoring_free(server, tmp_path):
    records, images = _batch(n=2)
    judge = rewards.load("vlm_judge", base_url=server.url("ok"), model="m", cache_dir=str(tmp_path), retries=0)
    first = judge(records, images)
    before = server.requests
    again = rewards.load("vlm_judge", base_url=server.url("ok"), model="m", cache_dir=str(tmp_path))(records, images)
    assert server.requests == before and torch.equal(first, again)
    # another judge model is another key
    rewards.load("vlm_judge", base_url=server.url("ok"), model="other", cache_dir=str(tmp_path))(records, images)
    assert server.requests == before + 2 * 4


def test_retries_with_backoff_then_succeed(server):
    with JudgeServer() as fresh:
        judge = rewards.load(
            "vlm_judge",
            base_url=fresh.url("flaky"),
            model="m",
            retries=2,
            backoff=0.05,
            max_concurrency=1,
            axes=["quality"],
        )
        records, images = _batch(n=1)
        t0 = time.perf_counter()
        out = judge(records, images)
        assert fresh.requests == 3 and out.shape == (1, 1)
        assert time.perf_counter() - t0 >= 0.05 + 0.1  # two waits: backoff, then twice that


@pytest.mark.parametrize(
    "mode, words",
    [
        ("fail", "HTTP 500"),
        ("malformed", "malformed JSON"),
        ("range", "0-10"),
        ("notjson", "not JSON"),
        ("slow", "no reply within 0.3 s"),
    ],
)
def test_a_judge_that_stays_wrong_stops_with_the_url_and_last_reply(server, mode, words):
    judge = rewards.load(
        "vlm_judge", base_url=server.url(mode), model="m", retries=1, backoff=0.01, timeout=0.3, axes=["quality"]
    )
    records, images = _batch(n=1)
    before = server.requests
    with pytest.raises(rewards.JudgeError, match="after 2 attempt") as e:
        judge(records, images)
    assert server.url(mode) in str(e.value) and words in str(e.value)
    assert server.requests - before == 2


def test_unreachable_judge_is_an_error_naming_it():
    judge = rewards.load("vlm_judge", base_url="http://127.0.0.1:9/v1", model="m", retries=0, axes=["quality"])
    with pytest.raises(rewards.JudgeError, match="127.0.0.1:9"):
        judge(*_batch(n=1))


def test_yesno_probability_from_logprobs(server):
    judge = rewards.load("vlm_judge", base_url=server.url("yesno"), model="m", mode="yesno", retries=0)
    out = judge(*_batch(n=2))
    assert out.shape == (2, 4) and ((out > 0) & (out < 1)).all()
    assert server.bodies[-1]["logprobs"] is True and server.bodies[-1]["max_tokens"] == 1


def test_concurrency_overlaps_requests():
    with JudgeServer(latency_s=0.2) as s:
        records, images = _batch(n=2, refs=2)  # 8 requests
        t0 = time.perf_counter()
        rewards.load("vlm_judge", base_url=s.url("latency"), model="m", max_concurrency=8)(records, images)
        assert time.perf_counter() - t0 < 8 * 0.2 / 2


def test_api_key_comes_from_the_environment_only(server, monkeypatch):
    with pytest.raises(TypeError, match="api_key_env"):
        rewards.load("vlm_judge", base_url=server.url(), model="m", api_key="sk-secret")
    with pytest.raises(ValueError, match="UNIREF_TEST_KEY"):
        rewards.load("vlm_judge", base_url=server.url(), model="m", api_key_env="UNIREF_TEST_KEY")
    monkeypatch.setenv("UNIREF_TEST_KEY", "sk-x")
    judge = rewards.load("vlm_judge", base_url=server.url(), model="m", api_key_env="UNIREF_TEST_KEY")
    assert judge.headers["Authorization"] == "Bearer sk-x"


def test_bad_inputs_are_clear():
    with pytest.raises(ValueError, match="unknown reward source 'nope'"):
        rewards.load("nope")
    with pytest.raises(ValueError, match="base_url"):
        rewards.load("vlm_judge", base_url="localhost:8000", model="m")
    judge = rewards.load("vlm_judge", base_url="http://127.0.0.1:9/v1", model="m")
    records, images = _batch(n=2)
    with pytest.raises(ValueError, match="2 records for 1 images"):
        judge(records, images[:1])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        judge(records, images[:, 0])


@pytest.mark.parametrize(
    "text, score",
    [
        ('{"score": 7, "reasoning": "ok"}', 7.0),
        ('Here:\n```json\n{"score": [8, 6.5], "reasoning": "x"}\n```', 6.5),
        ('```\n{"score": 0}\n```', 0.0),
    ],
)
def test_parse_score(text, score):
    assert parse_score(text) == score


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "empty"),
        ("no json", "no JSON"),
        ('{"score": 11}', "0-10"),
        ('{"score": -1}', "0-10"),
        ('{"reasoning": "x"}', 'no "score"'),
        ('{"score": "7"}', "number"),
        ('{"score": [7, }', "malformed"),
    ],
)
def test_parse_score_rejects(text, words):
    with pytest.raises(JudgeReplyError, match=words):
        parse_score(text)


def test_yes_probability():
    top = [
        {"token": " Yes", "logprob": math.log(0.6)},
        {"token": "no", "logprob": math.log(0.2)},
        {"token": "maybe", "logprob": math.log(0.2)},
    ]
    assert yes_probability(top) == pytest.approx(0.75)
    with pytest.raises(JudgeReplyError):
        yes_probability([{"token": "maybe", "logprob": 0.0}])


def test_synthetic_source_and_task_adapter():
    from uniref.synthetic import sample_task
    from uniref.synthetic.rewards import score_batch

    task = sample_task(0, size=32)
    image = torch.from_numpy(np.array(task.target)).permute(2, 0, 1)[None].float() / 255
    src = rewards.load("synthetic")
    assert src.names == ("integration", "consistency", "quality")
    assert torch.equal(src([task], image), score_batch([task], image))
    rec = rewards.as_record(task)
    assert rec.prompt == task.prompt and len(rec.references) == len(task.images)


def test_filter_groups_drops_saturated_groups_only():
    from uniref.rewards import filter_groups

    rewards_ = torch.tensor([0.95, 0.96, 0.2, 0.9, 0.95, 0.95, 0.1, 0.1])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    keep, dropped = filter_groups(rewards_, groups)
    # group 0: std 0.005, mean 0.955 -> dropped; 1: std 0.35; 2: std 0, mean 0.95 -> dropped; 3: low mean
    assert keep.tolist() == [False, False, True, True, False, False, True, True] and dropped == 0.5
    with pytest.raises(ValueError, match="group_ids"):
        filter_groups(rewards_, groups[:3])


def test_a_wrong_request_is_not_retried(server):
    judge = rewards.load(
        "vlm_judge", base_url=server.url("notfound"), model="m", retries=3, backoff=0.01, axes=["quality"]
    )
    before = server.requests
    with pytest.raises(rewards.JudgeError, match="HTTP 404.*does not exist"):
        judge(*_batch(n=1))
    assert server.requests - before == 1


def test_multisource_puts_sources_side_by_side_with_weights(server):
    from uniref.synthetic import sample_task

    tasks = [sample_task(i, size=32) for i in range(2)]
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    judge_args = {"base_url": server.url("ok"), "model": "m", "axes": ["quality"]}
    multi = rewards.MultiSource(
        [{"name": "synthetic", "weight": [1.0, 0.5, 0.5]}, {"name": "vlm_judge", "weight": 2, "args": judge_args}]
    )
    assert multi.names == ("synthetic/integration", "synthetic/consistency", "synthetic/quality", "vlm_judge/quality")
    assert multi.weights == [1.0, 0.5, 0.5, 2.0]
    out = multi(tasks, images)
    assert out.shape == (2, 4)
    assert torch.equal(out[:, :3], rewards.load("synthetic")(tasks, images))
    assert torch.equal(out[:, 3:], rewards.load("vlm_judge", **judge_args)(tasks, images))
    with pytest.raises(ValueError, match=r"rewards\[0\] \(synthetic\) has 2 weights"):
        rewards.MultiSource([{"name": "synthetic", "weight": [1, 2]}])
    with pytest.raises(ValueError, match=r"rewards\[0\] must be \{name, weight, args\}"):
        rewards.MultiSource([{"source": "synthetic"}])
