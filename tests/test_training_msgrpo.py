"""uniref.training.msgrpo in-process: prompts are encoded once per rollout and reused by every denoising
step and every trained timestep; the trajectory and log-probs come from the shared sampling loop."""

import json

import pytest
import torch

from uniref.presets import random_edit_pipeline
from uniref.training import load_config
from uniref.training.modules import EditModel
from uniref.training.msgrpo import rollout, rollout_tasks, score_rollout, train_on_rollout

from training_helpers import MSGRPO

# the training tests' MSGRPO run, with guidance and two minibatches
CONFIG = json.loads(json.dumps(MSGRPO))
CONFIG["deepspeed"] = {"zero_stage": 0}
CONFIG["msgrpo"].update(
    phases=[{"data": "compose", "steps": 2}], group_size=2, num_steps=5, sde_window=[1, 3], cfg_scale=2.0, minibatches=2
)


class PlainEngine:
    """The slice of DeepSpeed's engine MSGRPO uses (call, backward, step, module), over a plain optimizer:
    the trainer's DeepSpeed runs are tested end to end in the subprocess tests."""

    def __init__(self, module):
        self.module = module
        self.optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-3)

    def __call__(self, *args):
        return self.module(*args)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad()


class CountingEncoder:
    """Counts the text encoder's `encode_prompts` calls (the real encoder does the work)."""

    def __init__(self, encoder):
        self.calls = 0
        self._encode = encoder.encode_prompts
        encoder.encode_prompts = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._encode(*args, **kwargs)


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_prompts_are_encoded_once_per_rollout(train_text_encoder):
    cfg = load_config(base=CONFIG)
    pipe = random_edit_pipeline("tiny", seed=0)
    model = EditModel(pipe.transformer, pipe.text_encoder, train_text_encoder)
    engine = PlainEngine(model)
    counter = CountingEncoder(pipe.text_encoder)
    tasks = rollout_tasks(cfg.msgrpo, cfg.data, cfg.seed, 0)
    ro = rollout(engine, pipe, tasks, cfg.msgrpo, cfg.seed, step=0, rank=0, world=1)
    # 5 denoising steps x (conditional + unconditional) forwards, one encoding
    assert counter.calls == 1
    assert ro.prompts.embeds is not None and len(ro.prompts.texts) == 2 * len(ro.tasks)
    assert len(ro.states) == 6 and sorted(ro.log_probs) == [1, 2]
    assert all(torch.isfinite(lp).all() for lp in ro.log_probs.values())

    from uniref.synthetic import REWARD_NAMES, combine, score_batch
    from uniref.training.msgrpo import RewardFn

    score_rollout(ro, RewardFn(score_batch, tuple(REWARD_NAMES), combine), cfg.msgrpo)
    counter.calls = 0
    stats = train_on_rollout(engine, ro, cfg.msgrpo)
    trained_forwards = cfg.msgrpo.minibatches * len(ro.log_probs)
    # the update reuses the rollout's embeddings; a trained text encoder encodes again under grad, per forward
    assert counter.calls == (trained_forwards if train_text_encoder else 0)
    assert torch.isfinite(torch.as_tensor(stats["loss"]))


def test_rollout_subset_keeps_each_samples_prompts_and_trajectory():
    cfg = load_config(base=CONFIG)
    pipe = random_edit_pipeline("tiny", seed=0)
    engine = PlainEngine(EditModel(pipe.transformer, pipe.text_encoder, False))
    ro = rollout(engine, pipe, rollout_tasks(cfg.msgrpo, cfg.data, cfg.seed, 0), cfg.msgrpo, cfg.seed, 0, 0, 1)
    n = len(ro.tasks)
    part = ro.subset([2, 0])
    assert part.prompts.texts == [ro.prompts.texts[i] for i in (2, 0, n + 2, n)]
    lengths, cu = ro.prompts.lengths, [0]
    for length in lengths:
        cu.append(cu[-1] + length)
    expected = torch.cat([ro.prompts.embeds[cu[i] : cu[i + 1]] for i in (2, 0, n + 2, n)])
    assert torch.equal(part.prompts.embeds, expected)
    rows = ro.batch.targets.target_slices()
    assert torch.equal(part.states[3], torch.cat([ro.states[3][rows[2]], ro.states[3][rows[0]]]))
    assert torch.equal(part.schedule.sigmas, ro.schedule.sigmas[[2, 0]])
    assert part.batch.layout.image_sizes == tuple(ro.batch.layout.image_sizes[i] for i in (2, 0, n + 2, n))
