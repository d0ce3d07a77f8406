"""Cross-rank group advantages: 2 processes over gloo, groups split between the ranks, every rank must
get exactly (bitwise) what one process holding the whole batch computes; invalid input on one rank
must make every rank raise instead of leaving the others stuck in a collective."""

import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import uniref.grpo as grpo

WORLD = 2
SPLIT = 7  # rank 0 holds rows [0, 7), rank 1 the rest: several groups straddle the boundary
OPTIONS = [
    dict(aggregate="sum_then_normalize", std="group"),
    dict(aggregate="normalize_then_sum", std="batch", weights=[1.0, -0.5], clip=1.5),
    dict(aggregate="normalize_then_sum", std="group", eps=0.0),
]


def batch():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(16, 2, generator=g)
    group_ids = torch.tensor([3, 1, 3, 8, 1, 5, 8, 3, 1, 5, 8, 9, 9, 3, 2, 8])  # 2: alone, on rank 1
    rewards[group_ids == 5] = 0.25  # an all-equal group split across ranks
    return rewards, group_ids


def _worker(rank, init_file, out_files):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    try:
        rewards, ids = batch()
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        for k, options in enumerate(OPTIONS):
            results[k] = grpo.group_advantages(rewards[rows], ids[rows], **options)
        # rank 1's rewards hold a NaN: both ranks must raise (the check runs on the gathered batch)
        bad = rewards[rows].clone()
        if rank == 1:
            bad[2, 0] = float("nan")
        results["nan"] = _error(lambda: grpo.group_advantages(bad, ids[rows]))
        # rank 1 passes too few group ids: it raises its own error, rank 0 names rank 1
        short = ids[rows][:-1] if rank == 1 else ids[rows]
        results["short_ids"] = _error(lambda: grpo.group_advantages(rewards[rows], short))
        # mismatched options across ranks would give different advantages: refused on both
        results["options"] = _error(lambda: grpo.group_advantages(rewards[rows], ids[rows], clip=5.0 + rank))
    except Exception:  # noqa: BLE001 - reported to the parent, which fails the test with it
        results["crash"] = traceback.format_exc()
    finally:
        dist.destroy_process_group()
    torch.save(results, out_files[rank] + ".tmp")
    os.replace(out_files[rank] + ".tmp", out_files[rank])
    # Leave without running C++ static destructors: under a loaded full test run, a library thread
    # still joinable at interpreter exit occasionally aborted a worker ("terminate called without an
    # active exception") after its results were complete. The results are what this test checks.
    os._exit(0)


def _error(fn):
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return None


def test_advantages_across_two_gloo_ranks(tmp_path):
    outs = [tmp_path / f"rank{r}.pt" for r in range(WORLD)]
    context = mp.start_processes(
        _worker, args=(str(tmp_path / "init"), [str(o) for o in outs]), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.terminate()
            pytest.fail("the 2-rank gloo test did not finish in 120 s (a rank is stuck in a collective?)")
    results = [torch.load(o, weights_only=True) for o in outs]
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r} crashed:\n{res['crash']}"

    rewards, ids = batch()
    for k, options in enumerate(OPTIONS):
        whole, whole_stats = grpo.group_advantages(rewards, ids, **options)
        got = torch.cat([results[0][k][0], results[1][k][0]])
        assert torch.equal(got, whole), options
        assert (whole[ids == 5] == 0).all() and whole[ids == 2].item() == 0
        for r in range(WORLD):
            for key, value in whole_stats.items():
                assert torch.equal(torch.as_tensor(results[r][k][1][key]), torch.as_tensor(value)), (options, key)

    for r in range(WORLD):
        assert "non-finite values in 1 row(s) of the batch gathered over 2 ranks, first at row 9" in results[r]["nan"]
        assert "clip" in results[r]["options"]
    assert "group_ids must have shape (9,)" in results[1]["short_ids"]
    assert "rank(s) [1] received invalid input" in results[0]["short_ids"]
