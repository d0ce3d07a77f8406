"""uniref.sampling: per-sample schedules, the time shift, the batch being sampled, the Euler step and the
denoising loop, checked against diffusers' scheduler and against packing anew."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import uniref
from uniref.presets import qwenimage_scheduler
from uniref.sampling import SamplingBatch, Schedule, denoise, euler_step, make_schedule, shift_time


@pytest.fixture
def scheduler():
    return qwenimage_scheduler()


def test_each_sample_steps_on_its_own_schedule(scheduler):
    """Dynamic shift: mu follows each sample's target token count, as Qwen-Image computes it per call."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift

    from uniref.sampling import calculate_shift as ours

    schedule = make_schedule(scheduler, [16, 1024, 8192], 4, "cpu")
    for n, sigmas, timesteps in zip([16, 1024, 8192], schedule.sigmas, schedule.timesteps):
        mu = calculate_shift(n, 256, 8192, 0.5, 0.9)
        assert ours(n, 256, 8192, 0.5, 0.9) == mu
        alone = type(scheduler).from_config(scheduler.config)
        alone.set_timesteps(sigmas=np.linspace(1, 0.25, 4), mu=mu)
        assert torch.equal(sigmas, alone.sigmas)
        assert torch.equal(timesteps, alone.timesteps / 1000)
    assert not torch.allclose(schedule.sigmas[0], schedule.sigmas[2])
    assert len(scheduler.timesteps) == 1000  # the given scheduler is never set: it is only cloned


def test_one_step_has_no_schedule_with_a_terminal_shift(scheduler):
    with pytest.raises(ValueError, match="use more steps"):
        make_schedule(scheduler, [64], 1, "cpu")


@pytest.mark.parametrize("tokens", [16, 1024, 8192])
def test_shift_time_is_the_schedulers_shift(scheduler, tokens):
    """SFT draws its times through `shift_time`; they must be the sigmas the scheduler samples with (before
    its terminal stretch), or training and sampling would disagree on where the steps are."""
    cfg = {**scheduler.config, "shift_terminal": None}
    plain = type(scheduler).from_config(cfg)
    base = np.linspace(1.0, 0.1, 10)
    schedule = make_schedule(plain, [tokens], 10, "cpu")
    shifted = shift_time(torch.tensor(base, dtype=torch.float64), [tokens] * 10, cfg)
    torch.testing.assert_close(schedule.sigmas[0, :-1], shifted.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_step_equals_the_schedulers_step(scheduler, dtype):
    """The packed Euler step of every sample equals diffusers' `FlowMatchEulerDiscreteScheduler.step` run
    on each sample alone, bit for bit, in the model's dtype."""
    g = torch.Generator().manual_seed(0)
    sizes = [(4, 6), (8, 2), (2, 2)]
    layout = uniref.SequenceLayout.from_image_sizes([[s] for s in sizes], channels=3)
    schedule = make_schedule(scheduler, layout.target_lengths, 5, "cpu")
    state = torch.randn(layout.total_tokens, 12, generator=g).to(dtype)
    v = torch.randn(layout.total_tokens, 12, generator=g).to(dtype)
    got = euler_step(2, state, v, schedule, layout)
    for i, rows in enumerate(layout.target_slices()):
        s = type(scheduler).from_config(scheduler.config)
        s.set_timesteps(sigmas=np.linspace(1.0, 0.2, 5), mu=_mu(scheduler, layout.target_lengths[i]))
        s.set_begin_index(2)
        expected = s.step(v[rows], s.timesteps[2], state[rows], return_dict=False)[0]
        assert got.dtype == dtype and torch.equal(got[rows], expected), i


def _mu(scheduler, n):
    from uniref.sampling import calculate_shift

    c = scheduler.config
    return calculate_shift(n, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)


def test_sampling_batch_builds_the_model_stream_without_packing_targets():
    """`SamplingBatch` packs the references once; every step's image stream equals packing [target ; refs]
    anew, for guidance copies too, and samples without references hold no reference rows."""
    g = torch.Generator().manual_seed(0)
    target_sizes = [(4, 6), (2, 2), (6, 4)]
    refs = [
        [torch.randn(3, 2, 4, generator=g), torch.randn(3, 4, 4, generator=g)],
        [],
        [torch.randn(3, 2, 2, generator=g)],
    ]
    batch = SamplingBatch.build(target_sizes, refs, copies=2, patch_size=2, channels=3)
    targets = [torch.randn(3, h, w, generator=g) for h, w in target_sizes]
    state = uniref.pack_latents([[t] for t in targets]).tokens
    expected, layout = uniref.pack_latents([[t, *r] for t, r in zip(targets, refs)] * 2)
    assert torch.equal(batch.hidden_states(state), expected)
    assert batch.layout.image_sizes == layout.image_sizes
    assert torch.equal(batch.layout.cu_seqlens, layout.cu_seqlens)
    assert torch.equal(batch.layout.position_ids, layout.position_ids)
    assert batch.targets.image_sizes == tuple(((h, w),) for h, w in target_sizes)


def test_denoise_runs_one_guided_forward_per_step():
    calls = []

    def model_fn(hidden, t, layout):
        calls.append((hidden.shape[0], t.tolist(), layout.batch_size))
        return (
            torch.ones(layout.total_tokens // 1, 12)[: sum(layout.target_lengths)]
            * t.repeat_interleave(torch.tensor(layout.target_lengths))[:, None]
        )

    sizes = [(2, 2), (4, 2)]
    refs = [[torch.zeros(3, 2, 2)], [torch.zeros(3, 2, 2)]]
    batch = SamplingBatch.build(sizes, refs, copies=2, patch_size=2, channels=3)
    schedule = Schedule(torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.25, 0.0]]), torch.tensor([[1.0, 0.5], [1.0, 0.25]]))
    seen = []
    out = denoise(
        model_fn, batch, schedule, torch.zeros(3, 12), guidance_scale=3.0, callback=lambda k, x: seen.append(k)
    )
    assert len(calls) == 2 and seen == [0, 1]
    assert calls[0][2] == 4 and calls[0][1] == [1.0, 1.0, 1.0, 1.0]  # both guidance branches in one forward
    # cond == uncond == t: guidance keeps the velocity t; x = sum_k (sigma_{k+1} - sigma_k) * t_k
    torch.testing.assert_close(out[:1], torch.full((1, 12), -0.5 * 1.0 - 0.5 * 0.5))
    torch.testing.assert_close(out[1:], torch.full((2, 12), -0.75 * 1.0 - 0.25 * 0.25))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=2, max_size=5), min_size=1, max_size=4)
)
def test_rebuilding_the_image_stream_equals_packing_anew(layouts):
    """What the sampler does every step: keep the reference tokens, swap the targets, `concat_joint`."""
    g = torch.Generator().manual_seed(0)
    first = [[torch.randn(3, 2 * h, 2 * w, generator=g) for h, w in s] for s in layouts]
    new_targets = [torch.randn_like(s[0]) for s in first]
    tokens, layout = uniref.pack_latents(first)
    targets = uniref.pack_latents([[t] for t in new_targets]).tokens
    counts = [layout.image_tokens(i) for i in range(layout.batch_size)]
    cu_tgt = torch.tensor(np.cumsum([0] + [c[0] for c in counts]), dtype=torch.int32)
    cu_ref = torch.tensor(np.cumsum([0] + [sum(c[1:]) for c in counts]), dtype=torch.int32)
    assert torch.equal(layout.cu_targets, cu_tgt) and torch.equal(layout.cu_references, cu_ref)
    _, refs = uniref.split_joint(tokens, cu_tgt, cu_ref, targets.shape[0])
    rebuilt, cu = uniref.concat_joint(targets, cu_tgt, refs, cu_ref)
    expected, expected_layout = uniref.pack_latents([[t, *s[1:]] for t, s in zip(new_targets, first)])
    assert torch.equal(rebuilt, expected) and torch.equal(cu, expected_layout.cu_seqlens)
