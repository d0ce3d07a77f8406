"""Per-benchmark ratio bookkeeping shared by the benchmark files (the summary is in conftest.py)."""

_MEDIANS: dict[str, dict[str, float]] = {}


def record(benchmark, group: str, impl: str) -> None:
    """Keeps each entry's median and, once ours has run, stores the peer / ours ratios in extra_info.

    `group` must be unique across benchmark files; ours ("uniref") runs after its peers."""
    if benchmark.stats is None:  # --benchmark-disable
        return
    medians = _MEDIANS.setdefault(group, {})
    medians[impl] = benchmark.stats.stats.median
    if impl == "uniref":
        benchmark.extra_info["speedup_vs"] = {p: round(m / medians[impl], 3) for p, m in medians.items() if p != impl}
