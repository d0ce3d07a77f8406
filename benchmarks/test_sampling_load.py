"""Sampling on a busy machine: `uniref edit`'s sampling (the default model, 10 steps, 64x48 reference) with
and without a CPU hog (one bounded busy-loop process per core).

Each variant runs in its own worker process that imports uniref first, as the `uniref` command does (the
OpenMP runtime reads its wait policy once, when torch loads it); a round sends the worker one request and
times the reply. Groups:

(a) "sampling under load": uniref (passive OpenMP waiting, the library's default) vs spin_waiting (libgomp's own
    default spin count restored with GOMP_SPINCOUNT): the speed-up passive waiting buys under contention.
(b) "uniref quiet": the same sampling without the hog; the loaded run's extra_info["slowdown"] (printed) is
    loaded / quiet median, ideally near the CPU share lost (2 with one hog per core), not 10-40x.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 10
HOG_SECONDS = 300  # each hog stops by itself even if this process dies

WORKER = r"""
import sys
import uniref  # noqa: F401  (before torch: the OpenMP wait policy is read when torch loads)
import PIL.Image
import torch
from uniref.pipelines import UniRefEditPipeline

pipe = UniRefEditPipeline.from_pretrained()
pipe.set_progress_bar_config(disable=True)
image = PIL.Image.new("RGB", (64, 48), (200, 30, 30))
print("ready", flush=True)
for line in sys.stdin:
    pipe([image], "make it blue", num_inference_steps=int(line), generator=torch.Generator().manual_seed(0))
    print("done", flush=True)
"""

VARIANTS = {"uniref": {}, "spin_waiting": {"GOMP_SPINCOUNT": "300000"}}


class Worker:
    def __init__(self, env: dict):
        base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        base["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**base, **env},
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def sample(self) -> None:
        self.proc.stdin.write(f"{STEPS}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "done"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def start_hogs() -> list[subprocess.Popen]:
    loop = f"import time\nend = time.monotonic() + {HOG_SECONDS}\nwhile time.monotonic() < end:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(os.cpu_count() or 1)]


def stop_hogs(hogs) -> None:
    for hog in hogs:
        hog.kill()
        hog.wait()


@pytest.fixture(scope="module")
def workers():
    started = {name: Worker(env) for name, env in VARIANTS.items()}
    yield started
    for worker in started.values():
        worker.close()


_medians = {}


@pytest.mark.parametrize("loaded", [False, True], ids=["quiet", "loaded"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sampling_under_load(benchmark, workers, variant, loaded):
    if variant != "uniref" and not loaded:
        pytest.skip("spin waiting only matters under load")
    worker = workers[variant]
    worker.sample()  # warm
    hogs = start_hogs() if loaded else []
    try:
        time.sleep(0.5 if loaded else 0)  # let the hogs take their cores
        benchmark.group = "sampling under load" if loaded else "uniref quiet"
        benchmark.pedantic(worker.sample, rounds=2, iterations=1)
    finally:
        stop_hogs(hogs)
    benchmark.extra_info.update(steps=STEPS, hogs=len(hogs), variant=variant)
    if benchmark.stats is None:  # --benchmark-disable: the body ran once, nothing was timed
        return
    _medians[(variant, loaded)] = benchmark.stats.stats.median
    if (variant, loaded) == ("uniref", True) and ("uniref", False) in _medians:
        slowdown = _medians[("uniref", True)] / _medians[("uniref", False)]
        benchmark.extra_info["slowdown"] = slowdown
        print(f"\nuniref sampling, {len(hogs)} hog(s) vs quiet: {slowdown:.2f}x slower")
