"""The benchmark harness: its scheduling and statistics, its output, and a quick real run."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from bench import profile, report, stats
from bench.runner import Measurement, schedule
from bench.systems import fill
from bench.workloads import BY_NAME, WORKLOADS, available

REPO = Path(__file__).resolve().parent.parent


def measured(times: dict[tuple[str, str, int], float | None]) -> list[Measurement]:
    return [Measurement(r, workload, system, seconds, error=None if seconds else "boom")
            for (workload, system, r), seconds in times.items()]


def test_rounds_rotate_the_order():
    assert schedule(["a", "b", "c"], 4) == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_ratios_are_paired_per_round():
    # round 1 is slow for everyone: paired ratios stay 2.0, where ratios of medians would not
    data = measured({("w", "fo", 0): 1.0, ("w", "py", 0): 2.0,
                     ("w", "fo", 1): 10.0, ("w", "py", 1): 20.0,
                     ("w", "fo", 2): 1.5, ("w", "py", 2): None})
    assert stats.paired_ratios(data, "w", "py", "fo") == [2.0, 2.0]
    by_system = {s.system: s for s in stats.summarize(data, ["fo"])}
    assert by_system["py"].ratios["fo"] == stats.Spread(2.0, 2.0, 2.0)
    assert by_system["py"].seconds == stats.Spread(11.0, 2.0, 20.0)
    assert by_system["py"].errors == ["boom"]
    assert by_system["fo"].ratios == {}  # no ratio to itself


def test_markdown_and_json_lines(tmp_path):
    data = measured({("find", "native", 0): 0.5, ("find", "fo", 0): 1.0, ("find", "py", 0): 1.5})
    data[2].daemon_cpu, data[2].daemon_peak_rss_kib, data[2].daemon_peak_fds = 0.25, 2048, 7
    data[2].daemon_pss_kib = 1024
    text = report.markdown(stats.summarize(data, ["fo", "native"]), ["native", "fo", "py"], ["fo", "native"])
    assert "| find | 0.5 [0.5–0.5] | 1 [1–1] | 1.5 [1.5–1.5] |" in text
    assert "| find | 0.50× [0.50–0.50] | 1.50× [1.50–1.50] |" in text  # ratio to fo: native, py
    assert "| find | 0.25 / 2 / 1 / 7 |" in text  # only py has a daemon
    report.write_json_lines(data, tmp_path / "r.jsonl")
    assert report.read_json_lines(tmp_path / "r.jsonl") == data


def test_plot_writes_a_png(tmp_path):
    data = measured({("a", "fo", 0): 1.0, ("a", "py", 0): 1.5, ("b", "fo", 0): 1.0, ("b", "py", 0): 3.0})
    report.plot(stats.summarize(data, ["fo"]), ["fo", "py"], "fo", tmp_path / "p.png", "title")
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")


def test_templates_fill_each_lower_form():
    lowers = [Path("/l/top"), Path("/l/base")]
    assert fill("m -o lowerdir={lowerdir},upperdir={upper} {mnt}", lowers=lowers, upper="/u", mnt="/m") == \
        ["m", "-o", "lowerdir=/l/top:/l/base,upperdir=/u", "/m"]
    assert fill("unionfs {branches} {mnt}", lowers=lowers, upper="/u", mnt="/m") == \
        ["unionfs", "/u=RW:/l/top=RO:/l/base=RO", "/m"]


def test_quick_run_against_native_and_pyunionfs(tmp_path):
    """The documented command, --quick, on two systems: every workload measured, the outputs
    written, nothing left mounted."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--systems", "native,pyunionfs",
                             "--data", str(tmp_path / "data"), "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "**Ratio to native, paired per round: median [min–max]**" in result.stdout
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * len([w for w in WORKLOADS if available(w)]) and all(line["seconds"] > 0 for line in lines)
    assert all(line["daemon_cpu"] is not None for line in lines
               if line["system"] == "pyunionfs" and not BY_NAME[line["workload"]].timed_by_runner)
    assert (out / "ratios.png").exists() and (out / "table.md").exists()
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()


def test_profile_summary_counts_self_and_total(tmp_path):
    raw = tmp_path / "stacks.txt"
    # A frame name with a line break in it ends one line early: that part is skipped.
    raw.write_text("main;serve;lookup 6\nmain;serve;readdir;list 3\nmain;idle 1\nmain;odd (\nname) 0\n")
    summary = profile.summarize(raw, top=2)
    assert summary.splitlines()[:4] == ["10 samples", "self:", "   60.0%  lookup", "   30.0%  list"]
    assert "  100.0%  main" in summary and "   90.0%  serve" in summary


def test_profile_of_a_quick_workload(tmp_path):
    """`python -m bench.profile`: the workload runs on a fresh mount under py-spy, and nothing
    stays mounted."""
    result = subprocess.run([sys.executable, "-m", "bench.profile", "tar-read", "--quick",
                             "--data", str(tmp_path / "data")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("tar-read on pyunionfs: ") and "samples" in result.stdout
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()


def test_bad_input_is_one_line(tmp_path):
    for args in (["--systems", "native,nope"], ["--workloads", "nope"]):
        result = subprocess.run([sys.executable, "-m", "bench", *args, "--data", str(tmp_path)],
                                cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and result.stderr.startswith("bench: ") \
            and len(result.stderr.splitlines()) == 1, result.stderr


def test_killing_it_unmounts_what_it_mounted(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "bench", "--quick", "--systems", "pyunionfs", "--rounds", "3",
                             "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # until it measures (the mount is up)
            if line.startswith("[1/"):
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130, proc.stderr.read()[-2000:]
    finally:
        proc.kill()
        proc.wait()
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
