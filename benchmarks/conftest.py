"""Ratios, not seconds: after a benchmark run, print ours/peer for every group.

In each pytest-benchmark group the entry whose parameter id starts with "uniref" is ours; every
other entry is a peer measured in the same run. The summary shows peer_median / ours_median
(> 1: ours is faster).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _param(bench) -> str:
    return str(bench.param or bench.name)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        if bench.stats is not None and bench.stats.rounds:
            groups.setdefault(bench.group or bench.fullname, []).append(bench)
    lines = []
    for group, benches in groups.items():
        ours = [b for b in benches if _param(b).startswith("uniref")]
        for mine in ours:
            for peer in benches:
                if peer is mine or _param(peer).startswith("uniref"):
                    continue
                ratio = peer.stats.median / mine.stats.median
                lines.append(f"{group:<52} {_param(mine):<20} vs {_param(peer):<24} {ratio:7.2f}x")
    if lines:
        terminalreporter.write_sep("=", "uniref speed-up vs peers (peer median / ours median, same run)")
        for line in lines:
            terminalreporter.write_line(line)
