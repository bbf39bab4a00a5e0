"""Watcher faults with real processes (issue 6): two watchers and a manual CLI run racing on one root while a
writer process saves steps, and a long run of 55 steps with the watcher SIGKILLed and restarted twice, its
memory measured. Every process is bounded by a timeout and killed at the end if it is still running."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from molgen_export.pipeline import export
from molgen_export.options import ExportOptions
from molgen_export.watch.watcher import Watcher, WatchOptions
from molgen_export.watch.journal import JOURNAL_FILE, export_root_for, read_journal
from tests.helpers.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
WRITER = REPO / "tests" / "helpers" / "step_writer.py"
RSS_GROWTH_BOUND = 50 * 2**20
"""Most the watcher's resident memory may grow between its export of step 10 and of step 50."""


@pytest.fixture
def processes():
    """Processes a test starts; any still running at the end is SIGKILLed (by its own pid) and reaped."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def start(processes: list[subprocess.Popen], argv: list[str], log: Path) -> subprocess.Popen:
    """Start `python ARGV` in the repository, its output in `log`."""
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    processes.append(process)
    return process


def watch_argv(checkpoint_root: Path, *extra: str) -> list[str]:
    return ["-m", "molgen_export", "watch", str(checkpoint_root), "--poll", "off", "--threads", "1", "--nice", "0",
            "--retry-backoff", "0.5", "-v", *extra]


def writer_argv(checkpoint_root: Path, run, steps: str, gap: float) -> list[str]:
    return [str(WRITER), str(checkpoint_root), "--steps", steps, "--gap", str(gap),
            "--vocab-size", str(run.arch.vocab_size), *([] if run.arch.tie_word_embeddings else ["--untied"])]


def finish(process: subprocess.Popen, timeout: float, log: Path) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{log.name} still running after {timeout} s:\n{log.read_text()[-3000:]}") from None


class JournalTail:
    """Reads the watch journal's new lines as they are appended (a half-written last line is kept for later)."""

    def __init__(self, export_root: Path):
        self.path = export_root / JOURNAL_FILE
        self.offset = 0
        self.entries: list[dict] = []

    def poll(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        new = [json.loads(line) for line in complete.splitlines() if line.strip()]
        self.entries += new
        return new

    def steps(self, status: str) -> list[dict]:
        return [e for e in self.entries if e.get("event") == "step" and e["status"] == status]


def vm_rss_bytes(pid: int) -> int:
    """VmRSS of a live process, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def assert_no_partial_output(export_root: Path) -> None:
    for child in export_root.iterdir():
        assert ".tmp-" not in child.name and ".old-" not in child.name, f"leftover temporary folder {child}"
        if child.name.endswith("-hf"):
            assert (child / export.REPORT_FILE).is_file(), f"{child} was published without its report"


def assert_published_from_source(export_root: Path, checkpoint_root: Path, steps) -> dict[int, dict]:
    reports = {}
    for step in steps:
        report_path = export_root / f"step-{step}-hf" / export.REPORT_FILE
        assert report_path.is_file(), f"step-{step} was never published"
        report = json.loads(report_path.read_text())
        assert report["status"] == "exported"
        assert report["source_fingerprint"] == export.source_fingerprint(checkpoint_root / f"step-{step}")
        reports[step] = report
    return reports


def test_a_step_published_by_another_exporter_while_the_watcher_plans_is_journaled_skipped(demo_run):
    """The window the CLI race hit: the watcher has claimed and re-checked a step, another exporter (a manual CLI
    run) publishes it, then the watcher's `export_step` takes the step lock. It must not export again, and the
    watcher must journal `skipped`, not a second `exported`."""
    options = ExportOptions(skip_logits=True, threads=1)
    published_by_other = []

    def another_exporter_finishes_first(step_dir: Path) -> None:  # called after the claim, before export_step
        published_by_other.append(export.export_step(step_dir, options).status)

    watcher = Watcher(demo_run.checkpoint_root, options, WatchOptions(once=True, nice=0, rescan=0),
                      before_export=another_exporter_finishes_first)
    outcomes = watcher.run()
    assert published_by_other == ["exported", "exported"]
    assert [(o.step, o.status) for o in outcomes] == [(10, "skipped"), (20, "skipped")]
    assert not [e for e in read_journal(watcher.export_root) if e.get("status") == "exported"]
    assert_published_from_source(watcher.export_root, demo_run.checkpoint_root, (10, 20))
    assert_no_partial_output(watcher.export_root)


@pytest.mark.slow
def test_two_watcher_processes_and_a_manual_cli_run_export_each_step_once(demo_run, processes, tmp_path):
    """Three exporters on one root while a writer saves: each step exported by exactly one of them, verified."""
    root = demo_run.checkpoint_root
    export_root = export_root_for(root, ExportOptions())
    writer_steps = [30, 40, 50, 60, 70, 80]
    steps = [10, 20, *writer_steps]
    logs = {name: tmp_path / f"{name}.log" for name in ("writer", "watcher-a", "watcher-b", "cli")}
    writer = start(processes, writer_argv(root, demo_run, ",".join(map(str, writer_steps)), gap=0.4),
                   logs["writer"])
    # each watcher drains and exits once the writer has ended; a step the other one holds is looked at again
    # after 0.3 s, so both settle every step
    watchers = [start(processes, watch_argv(root, "--until-pid", str(writer.pid), "--locked-recheck", "0.3"),
                      logs[name]) for name in ("watcher-a", "watcher-b")]
    for name in ("watcher-a", "watcher-b"):
        wait_until(lambda: "with inotify" in logs[name].read_text(), 60, f"{name}'s observer")
    wait_until(lambda: (root / "step-30" / ".metadata").is_file(), 60, "the writer's first save")
    cli = start(processes, ["-m", "molgen_export", "--dcp-path", str(root), "--threads", "1", "-v"], logs["cli"])

    assert finish(writer, 60, logs["writer"]) == 0, logs["writer"].read_text()
    cli_code = finish(cli, 120, logs["cli"])
    for watcher, name in zip(watchers, ("watcher-a", "watcher-b")):
        assert finish(watcher, 120, logs[name]) == 0, logs[name].read_text()

    cli_out = logs["cli"].read_text()
    journal = [e for e in read_journal(export_root) if e["event"] == "step"]
    by_step: dict[int, list[str]] = {step: [] for step in steps}
    for entry in journal:
        if entry["status"] == "exported":
            by_step[entry["step"]].append(f"watcher pid {entry['pid']}")
    for match in re.finditer(r"^step-(\d+)  ok ", cli_out, re.M):
        by_step[int(match.group(1))].append("cli")
    doubles = {step: who for step, who in by_step.items() if len(who) != 1}
    assert not doubles, (f"steps not exported exactly once (step: exporters): {doubles}\n"
                         f"journal: {[(e['step'], e['status'], e['pid']) for e in journal]}\ncli:\n{cli_out}")
    # the CLI either exported a step, skipped it (done before), or was told another process held it
    for line in re.findall(r"^step-\d+  FAILED  .*$", cli_out, re.M):
        assert "is being exported by another process" in line, cli_out
    assert cli_code in (0, 2), cli_out
    print("exported by: " + ", ".join(f"step-{step} {who[0]}" for step, who in by_step.items()))
    for step, report in assert_published_from_source(export_root, root, steps).items():
        assert report["fidelity"]["max_abs_diff"] <= 1e-3, step  # every step verified with logits
    assert_no_partial_output(export_root)


@pytest.mark.slow
def test_long_run_with_two_watcher_kills_exports_every_step_once_and_memory_stays_flat(demo_run, processes,
                                                                                       tmp_path):
    """55 steps saved by a writer process while a watcher process runs the whole time, SIGKILLed twice (once
    mid-export, once right after a publish) and restarted; its RSS measured when steps 10 and 50 are exported."""
    root = demo_run.checkpoint_root
    for step_dir in demo_run.steps:  # the run starts empty: every step comes from the writer
        shutil.rmtree(step_dir)
    export_root = export_root_for(root, ExportOptions())
    steps = range(1, 56)
    started = time.monotonic()
    writer_log = tmp_path / "writer.log"
    writer = start(processes, writer_argv(root, demo_run, f"{steps[0]}-{steps[-1]}", gap=0.25), writer_log)
    journal = JournalTail(export_root)
    first_seen: dict[int, tuple[int, int]] = {}
    """step -> (inode of step-N-hf, mtime of its report) when the monitor first saw it published."""

    def note_published() -> None:
        if not export_root.is_dir():
            return
        for entry in os.scandir(export_root):
            found = re.fullmatch(r"step-(\d+)-hf", entry.name)
            if found and int(found.group(1)) not in first_seen:
                try:
                    report_mtime = os.stat(Path(entry.path) / export.REPORT_FILE).st_mtime_ns
                    first_seen[int(found.group(1))] = (entry.inode(), report_mtime)
                except FileNotFoundError:
                    pass

    def monitor(condition: Callable[[], object], timeout: float, what: str):
        def check():
            note_published()
            journal.poll()
            return condition()
        return wait_until(check, timeout, what, interval=0.005)

    watchers: list[subprocess.Popen] = []
    logs: list[Path] = []

    def start_watcher() -> subprocess.Popen:
        logs.append(tmp_path / f"watcher-{len(logs) + 1}.log")
        watchers.append(start(processes, watch_argv(root, "--skip-logits", "--until-pid", str(writer.pid)),
                              logs[-1]))
        return watchers[-1]

    # kill 1: mid-export (its temporary folder exists), after it has published two steps
    first = start_watcher()

    def in_flight_temp() -> Path | None:
        if len(first_seen) < 2 or not export_root.is_dir():
            return None
        return next(iter(export_root.glob(f".step-*-hf.tmp-{first.pid}-*")), None)

    temp = monitor(in_flight_temp, 60, "the first watcher's third export in flight")
    first.send_signal(signal.SIGKILL)
    assert first.wait(30) == -signal.SIGKILL
    killed_mid_export = int(re.match(r"\.step-(\d+)-hf", temp.name).group(1))

    # kill 2: the moment the restarted watcher has published a step (before or after its journal line)
    second = start_watcher()
    published_before = set(first_seen)
    new_step = monitor(lambda: next(iter(set(first_seen) - published_before), None), 60,
                       "the second watcher's first publish")
    second.send_signal(signal.SIGKILL)
    assert second.wait(30) == -signal.SIGKILL
    journal.poll()
    killed_after_publish = new_step
    journaled_before_kill = any(e["step"] == new_step and e["pid"] == second.pid for e in journal.steps("exported"))

    # the third watcher runs to the end: it drains and exits once the writer has ended
    third = start_watcher()
    rss: dict[int, int] = {}

    def measure_rss() -> bool:
        for entry in journal.steps("exported"):
            if entry["step"] in (10, 50) and entry["step"] not in rss and entry["pid"] == third.pid:
                rss[entry["step"]] = vm_rss_bytes(third.pid)
        return len(rss) == 2 or third.poll() is not None

    monitor(measure_rss, 110, "steps 10 and 50 exported by the third watcher")
    assert rss.keys() == {10, 50}, f"steps 10 and 50 were not both exported by the last watcher: {rss}"
    assert finish(writer, 60, writer_log) == 0, writer_log.read_text()
    assert finish(third, 60, logs[-1]) == 0, logs[-1].read_text()
    note_published()
    journal.poll()
    wall = time.monotonic() - started

    # "Exactly once" across kills, precisely. A step is exported when its `step-N-hf` folder is published (one
    # rename); the journal line follows it. So: (1) every step ends with one published folder, from this very
    # save (source fingerprint), never replaced after the monitor first saw it (same directory inode and report
    # mtime: a second export would publish a new directory); (2) the journal holds at most one `exported` line
    # per step; (3) a step with no `exported` line is one whose exporter was SIGKILLed between its publishing
    # rename and its journal append: it is still exported once (the folder), only the step whose publish
    # triggered kill 2 (or the one in flight at kill 1) can be in that case, and a later watcher must then have
    # recorded it `skipped` (found exported from the same save) rather than exporting it again.
    assert_published_from_source(export_root, root, steps)
    for step in steps:
        folder = export_root / f"step-{step}-hf"
        assert (folder.stat().st_ino, (folder / export.REPORT_FILE).stat().st_mtime_ns) == first_seen[step], \
            f"step-{step}-hf was replaced after it was first published"
    exported = Counter(e["step"] for e in journal.steps("exported"))
    assert max(exported.values()) == 1, {step: n for step, n in exported.items() if n > 1}
    unjournaled = set(steps) - set(exported)
    assert unjournaled <= {killed_mid_export, killed_after_publish}, unjournaled
    for step in unjournaled:
        assert any(e["step"] == step and e["pid"] in (second.pid, third.pid) for e in journal.steps("skipped")), step
    assert_no_partial_output(export_root)
    assert not journal.steps("failed") and not journal.steps("gave-up"), journal.steps("failed")

    growth = rss[50] - rss[10]
    print(f"long run: {len(steps)} steps, {len(exported)} journaled `exported` + {len(unjournaled)} published "
          f"then killed before the journal line; 2 SIGKILLs (step-{killed_mid_export} mid-export, "
          f"step-{killed_after_publish} after publish, journaled before the kill: {journaled_before_kill}), "
          f"2 restarts; watcher RSS at step 10 {rss[10] / 2**20:.1f} MiB, at step 50 {rss[50] / 2**20:.1f} MiB "
          f"(growth {growth / 2**20:+.1f} MiB); wall {wall:.1f} s")
    assert growth < RSS_GROWTH_BOUND, f"watcher RSS grew {growth / 2**20:.1f} MiB between steps 10 and 50"
