"""The SFT loss (uniref/training/sft.py), in process on the tiny preset."""

from __future__ import annotations

import torch

from uniref.training import load_config

from training_helpers import SFT


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
        same = dataclasses.replace(
            batch, items=[dataclasses.replace(it, references=[it.target, *it.references[1:]]) for it in batch.items]
        )
        torch.testing.assert_close(
            sft_loss(model, pipe, same, weighted, seed=0, step=1)[0],
            sft_loss(model, pipe, same, cfg.sft, seed=0, step=1)[0],
            rtol=1e-6,
            atol=0,
        )
