"""Medians with their range, and ratios paired per round (a system against a baseline measured in
the same round), which hold up better than absolute times on a noisy machine."""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from bench.runner import Measurement


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> "Spread | None":
        return cls(statistics.median(values), min(values), max(values)) if values else None


@dataclass(frozen=True)
class Summary:
    workload: str
    system: str
    seconds: Spread | None
    ratios: dict[str, Spread]  # baseline system -> paired ratio
    daemon_cpu: Spread | None
    daemon_peak_rss_kib: int | None
    daemon_peak_fds: int | None
    daemon_pss_kib: int | None  # the largest of the rounds
    errors: list[str]


def paired_ratios(measurements: list[Measurement], workload: str, system: str, baseline: str) -> list[float]:
    """SYSTEM's time over BASELINE's, per round in which both have one."""
    times: dict[tuple[str, int], float] = {
        (m.system, m.round): m.seconds for m in measurements
        if m.workload == workload and m.seconds is not None}
    return [times[(system, r)] / times[(baseline, r)]
            for (name, r) in sorted(times) if name == system
            and (baseline, r) in times and times[(baseline, r)] > 0]


def summarize(measurements: list[Measurement], baselines: list[str]) -> list[Summary]:
    """One summary per (workload, system), in the order they were first measured."""
    keys = list(dict.fromkeys((m.workload, m.system) for m in measurements))
    summaries = []
    for workload, system in keys:
        mine = [m for m in measurements if (m.workload, m.system) == (workload, system)]
        ok = [m for m in mine if m.seconds is not None]
        cpu = [m.daemon_cpu for m in ok if m.daemon_cpu is not None]
        rss = [m.daemon_peak_rss_kib for m in ok if m.daemon_peak_rss_kib is not None]
        fds = [m.daemon_peak_fds for m in ok if m.daemon_peak_fds is not None]
        pss = [m.daemon_pss_kib for m in ok if m.daemon_pss_kib is not None]
        ratios = {baseline: Spread.of(paired_ratios(measurements, workload, system, baseline))
                  for baseline in baselines if baseline != system}
        summaries.append(Summary(workload, system, Spread.of([m.seconds for m in ok]),
                                 {b: spread for b, spread in ratios.items() if spread},
                                 Spread.of(cpu), max(rss) if rss else None, max(fds) if fds else None,
                                 max(pss) if pss else None,
                                 [m.error for m in mine if m.error]))
    return summaries
