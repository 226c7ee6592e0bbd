"""Output: Markdown tables, raw JSON lines, and a bar chart of the paired ratios."""
from __future__ import annotations

import json
from pathlib import Path

from bench.runner import Measurement
from bench.stats import Spread, Summary


def _seconds(spread: Spread | None) -> str:
    if spread is None:
        return "failed"
    return f"{spread.median:.3g} [{spread.low:.3g}–{spread.high:.3g}]"


def _ratio(spread: Spread | None) -> str:
    return "" if spread is None else f"{spread.median:.2f}× [{spread.low:.2f}–{spread.high:.2f}]"


def _table(title: str, columns: list[str], rows: dict[str, list[str]]) -> str:
    lines = [f"**{title}**", "", "| workload | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()]
    return "\n".join(lines) + "\n"


def markdown(summaries: list[Summary], systems: list[str], baselines: list[str]) -> str:
    """The tables: time per system, ratios to each baseline, and the FUSE daemons' cost."""
    cell = {(s.workload, s.system): s for s in summaries}
    workloads = list(dict.fromkeys(s.workload for s in summaries))

    def table(title: str, columns: list[str], render) -> str:
        return _table(title, columns, {w: [render(cell[(w, name)]) if (w, name) in cell else ""
                                           for name in columns] for w in workloads})

    parts = [table("Seconds, median [min–max]", systems, lambda s: _seconds(s.seconds))]
    for baseline in baselines:
        if baseline in systems:
            parts.append(table(f"Ratio to {baseline}, paired per round: median [min–max]",
                               [name for name in systems if name != baseline],
                               lambda s, b=baseline: _ratio(s.ratios.get(b))))
    daemons = [name for name in systems if any(s.daemon_cpu is not None for s in summaries if s.system == name)]
    if daemons:
        parts.append(table("FUSE daemon: CPU seconds (median) / peak RSS MiB / PSS MiB at the end / peak open fds",
            daemons, lambda s: "" if s.daemon_cpu is None else
            f"{s.daemon_cpu.median:.2f} / {(s.daemon_peak_rss_kib or 0) / 1024:.0f} / "
            f"{(s.daemon_pss_kib or 0) / 1024:.0f} / {s.daemon_peak_fds or 0}"))
    errors = [f"- {s.system} {s.workload}: {error}" for s in summaries for error in dict.fromkeys(s.errors)]
    if errors:
        parts.append("**Failures**\n\n" + "\n".join(errors) + "\n")
    return "\n".join(parts)


def write_json_lines(measurements: list[Measurement], path: Path) -> None:
    with open(path, "w") as f:
        for measurement in measurements:
            f.write(json.dumps(measurement.to_json()) + "\n")


def read_json_lines(path: Path) -> list[Measurement]:
    with open(path) as f:
        return [Measurement(**json.loads(line)) for line in f if line.strip()]


def plot(summaries: list[Summary], systems: list[str], baseline: str, path: Path, title: str) -> None:
    """Bars of each system's median ratio to BASELINE per workload, error bars from min to max,
    on a log scale with the line at 1 (as fast as the baseline)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell = {(s.workload, s.system): s.ratios.get(baseline) for s in summaries}
    workloads = list(dict.fromkeys(s.workload for s in summaries))
    shown = [name for name in systems if name != baseline]
    width = 0.8 / max(len(shown), 1)
    fig, ax = plt.subplots(figsize=(max(8, len(workloads) * 0.7), 5))
    for i, name in enumerate(shown):
        spreads = [cell.get((w, name)) for w in workloads]
        xs = [x + i * width for x, spread in enumerate(spreads) if spread]
        got = [spread for spread in spreads if spread]
        ax.bar(xs, [s.median for s in got], width, label=name,
               yerr=[[s.median - s.low for s in got], [s.high - s.median for s in got]], capsize=2)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(2.0, color="grey", linewidth=0.8, linestyle="--")  # pyunionfs's goal against fuse-overlayfs
    ax.set_yscale("log")
    ax.set_ylabel(f"time / {baseline} time (paired per round)")
    ax.set_xticks([x + width * (len(shown) - 1) / 2 for x in range(len(workloads))])
    ax.set_xticklabels(workloads, rotation=45, ha="right")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
