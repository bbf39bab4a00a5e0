"""The watcher on real DCP saves: a background writer saves step after step (shards, then `.metadata` renamed
into place after a delay) while the watcher runs; crashes, signals, two watchers, purges, failures, hooks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from molgen_export.integrations.demo_trainer import save_checkpoint
from molgen_export.pipeline import export
from molgen_export.options import ExportOptions
from molgen_export.watch.watcher import Watcher, WatchOptions
from molgen_export.watch.events import filesystem_type, is_network_filesystem, polling_interval, step_dir_for_event
from molgen_export.watch.journal import failure_record_path, read_journal
from tests.helpers.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
FAST = ExportOptions(skip_logits=True, threads=1)
QUIET = dict(nice=0, rescan=0, retry_backoff=0.1)


def exported_counts(export_root: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    for entry in read_journal(export_root):
        if entry["event"] == "step" and entry["status"] == "exported":
            counts[entry["step"]] = counts.get(entry["step"], 0) + 1
    return counts


def assert_no_partial_output(export_root: Path) -> None:
    if not export_root.is_dir():
        return
    for child in export_root.iterdir():
        assert ".tmp-" not in child.name and ".old-" not in child.name, f"leftover temporary folder {child}"
        if child.name.endswith("-hf"):
            assert (child / export.REPORT_FILE).is_file(), f"{child} was published without its report"


class BackgroundWriter(threading.Thread):
    """Saves real DCP checkpoints of the run's model, one step after another, like TorchTitan's CheckpointManager."""

    def __init__(self, checkpoint_root: Path, arch, steps, *, commit_delay: float = 0.3, gap: float = 0.2):
        super().__init__(daemon=True)
        self.checkpoint_root, self.arch, self.steps = checkpoint_root, arch, steps
        self.commit_delay, self.gap = commit_delay, gap
        self.error: BaseException | None = None

    def run(self):
        import torch

        from molgen_export.demo import build_model, titan_checkpoint_state

        try:
            model = build_model(self.arch, seed=1)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            for step in self.steps:
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.01 * step)
                time.sleep(self.gap)
                save_checkpoint(titan_checkpoint_state(model, optimizer, step), self.checkpoint_root / f"step-{step}",
                                self.commit_delay)
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def make_in_progress_step(run, step: int) -> Path:
    """A step folder with its shards but no `.metadata`, as DCP leaves it mid-save."""
    scratch = run.workdir / f"scratch-{step}"
    shutil.copytree(run.steps[0], scratch)
    step_dir = run.checkpoint_root / f"step-{step}"
    step_dir.mkdir()
    for shard in scratch.glob("*.distcp"):
        shutil.copy2(shard, step_dir / shard.name)
    return step_dir


def test_event_paths_pick_step_metadata_and_ignore_our_own_files(tmp_path):
    root = tmp_path / "checkpoint"
    assert step_dir_for_event(root, str(root / "step-10" / ".metadata")) == (root / "step-10", "metadata")
    assert step_dir_for_event(root, str(root / "step-10")) == (root / "step-10", "dir")
    for ignored in ("step-10-hf/.metadata", "step-10/.metadata.tmp", "step-10/__0_0.distcp",
                    ".step-10-hf.tmp-1-ab/config.json", ".step-10-hf.lock", "step-10/sharded/.metadata",
                    "config.json", "step-x/.metadata"):
        assert step_dir_for_event(root, str(root / ignored)) is None, ignored
    assert step_dir_for_event(root, str(tmp_path / "elsewhere" / "step-1" / ".metadata")) is None


def test_polling_is_chosen_on_network_filesystems(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\n"
                      f"server:/export {tmp_path}/nfs nfs4 rw 0 0\n"
                      f"lustre@tcp:/fs {tmp_path}/lustre lustre rw 0 0\n"
                      f"sshfs {tmp_path}/fuse fuse.sshfs rw 0 0\n")
    assert filesystem_type(tmp_path / "nfs" / "run" / "checkpoint", mounts) == "nfs4"
    assert filesystem_type(tmp_path / "local", mounts) == "ext4"
    assert all(is_network_filesystem(t) for t in ("nfs", "nfs4", "lustre", "gpfs", "cifs", "fuse.sshfs"))
    assert not any(is_network_filesystem(t) for t in ("ext4", "xfs", "tmpfs", "btrfs", "overlay"))
    assert polling_interval(tmp_path / "lustre" / "ckpt", "auto", mounts) == 10.0
    assert polling_interval(tmp_path / "fuse" / "ckpt", "auto", mounts) == 10.0
    assert polling_interval(tmp_path / "local", "auto", mounts) is None
    assert polling_interval(tmp_path / "nfs", "off", mounts) is None
    assert polling_interval(tmp_path / "local", "2.5", mounts) == 2.5


@pytest.mark.parametrize("poll", ["off", "0.2"], ids=["inotify", "polling"])
def test_background_saves_each_complete_step_exported_once(demo_run, poll):
    in_progress = make_in_progress_step(demo_run, 50)
    in_progress_files = sorted(p.name for p in in_progress.iterdir())
    writer = BackgroundWriter(demo_run.checkpoint_root, demo_run.arch, [30, 40])
    watcher = Watcher(demo_run.checkpoint_root, FAST, WatchOptions(poll=poll, **QUIET))
    watcher.start()
    wait_until(lambda: watcher.mode != "starting", 30, "the observer")  # new saves are then seen, not scanned
    writer.start()
    try:
        wait_until(lambda: {10, 20, 30, 40} <= set(exported_counts(watcher.export_root)), 60, "four exports")
    finally:
        watcher.stop()
        assert watcher.join(30)
    assert writer.error is None
    assert exported_counts(watcher.export_root) == {10: 1, 20: 1, 30: 1, 40: 1}
    assert watcher.mode == ("inotify" if poll == "off" else "poll")
    # the in-progress step was never read, queued or exported
    assert sorted(p.name for p in in_progress.iterdir()) == in_progress_files
    assert not (watcher.export_root / "step-50-hf").exists()
    assert 50 not in {o.step for o in watcher.outcomes}
    exported = {o.step: o for o in watcher.outcomes if o.status == "exported"}
    assert [o.step for o in watcher.outcomes if o.status == "exported"][:2] == [10, 20]  # found at start, in order
    for step in (30, 40):  # found by the observer, not the start-up scan
        assert exported[step].detected_via == watcher.mode
        assert 0 <= exported[step].start_latency_s < 10
    for step in (10, 20, 30, 40):
        step_dir = demo_run.checkpoint_root / f"step-{step}"
        report = json.loads((watcher.export_root / f"step-{step}-hf" / export.REPORT_FILE).read_text())
        assert report["source_fingerprint"] == export.source_fingerprint(step_dir)
    assert_no_partial_output(watcher.export_root)


def test_two_watchers_on_one_root_export_each_step_once(demo_run):
    writer = BackgroundWriter(demo_run.checkpoint_root, demo_run.arch, [30], commit_delay=0.1)
    watchers = [Watcher(demo_run.checkpoint_root, FAST, WatchOptions(poll="off", locked_recheck=0.2, **QUIET))
                for _ in range(2)]
    for watcher in watchers:
        watcher.start()
    writer.start()
    export_root = watchers[0].export_root

    def final_statuses(step):
        return sorted(o.status for w in watchers for o in list(w.outcomes) if o.step == step and o.status != "locked")

    try:
        wait_until(lambda: all(len(final_statuses(step)) >= 2 for step in (10, 20, 30)), 60,
                   "both watchers to settle every step")
    finally:
        for watcher in watchers:
            watcher.stop()
            assert watcher.join(30)
    assert exported_counts(export_root) == {10: 1, 20: 1, 30: 1}
    for step in (10, 20, 30):
        assert final_statuses(step) == ["exported", "skipped"], step
    assert_no_partial_output(export_root)


def test_step_deleted_mid_read_ends_cleanly_and_later_steps_export(demo_run, monkeypatch):
    from molgen_export.dcp import read

    real_read_step_metadata = read.read_step_metadata
    purged = demo_run.checkpoint_root / "step-10"

    def read_then_purge(step_dir, *args, **kwargs):
        meta = real_read_step_metadata(step_dir, *args, **kwargs)
        if step_dir == purged:
            shutil.rmtree(purged)  # TorchTitan's keep_latest_k purge, after the metadata, before the shards
        return meta

    monkeypatch.setattr(read, "read_step_metadata", read_then_purge)
    watcher = Watcher(demo_run.checkpoint_root, FAST, WatchOptions(once=True, **QUIET))
    outcomes = watcher.run()
    assert [(o.step, o.status) for o in outcomes] == [(10, "vanished"), (20, "exported")]
    assert "deleted while it was read" in outcomes[0].error
    assert not (watcher.export_root / "step-10-hf").exists()
    assert not failure_record_path(watcher.export_root / "step-10-hf").exists()  # no retry, no failure
    assert_no_partial_output(watcher.export_root)


def test_failed_step_is_recorded_retried_then_given_up_and_not_retried_after_restart(demo_run):
    shard = next((demo_run.checkpoint_root / "step-10").glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    options = WatchOptions(once=True, retries=1, **QUIET)
    outcomes = Watcher(demo_run.checkpoint_root, FAST, options).run()
    assert [(o.step, o.status) for o in outcomes] == [(10, "failed"), (20, "exported"), (10, "gave-up")]
    export_root = Watcher(demo_run.checkpoint_root, FAST).export_root
    record = json.loads(failure_record_path(export_root / "step-10-hf").read_text())
    assert record["attempts"] == 2 and record["gave_up"] and "truncated" in record["error"]
    assert record["error_type"] == "CheckpointFormatError"
    # a restarted watcher does not hammer the same broken save again
    again = Watcher(demo_run.checkpoint_root, FAST, options).run()
    assert [(o.step, o.status) for o in again] == [(10, "gave-up"), (20, "skipped")]
    assert "delete" in again[0].error
    failure_record_path(export_root / "step-10-hf").unlink()  # the documented way to try again
    assert [o.status for o in Watcher(demo_run.checkpoint_root, FAST, options).run()][0] == "failed"
    assert_no_partial_output(export_root)


def test_on_export_commands_run_and_their_failure_is_recorded(demo_run):
    marker = demo_run.workdir / "hook-ran.txt"
    hook = f'{{python}} -c "import sys; open(sys.argv[1], \'a\').write(sys.argv[2] + chr(10)); sys.exit(int(sys.argv[2]) // 10 - 1)" {marker} {{step}}'
    watcher = Watcher(demo_run.checkpoint_root, FAST, WatchOptions(once=True, on_export=hook, **QUIET))
    outcomes = watcher.run()
    assert [o.status for o in outcomes] == ["exported", "exported"]
    assert marker.read_text().split() == ["10", "20"]
    hooks = [e for e in read_journal(watcher.export_root) if e["event"] == "on_export"]
    assert [(e["step"], e["exit_code"]) for e in hooks] == [(10, 0), (20, 1)]  # step-20's hook failed, recorded
    assert hooks[0]["argv"][-2:] == [str(marker), "10"]


def test_until_pid_drains_and_exits_after_the_process_ends(demo_run):
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    writer = BackgroundWriter(demo_run.checkpoint_root, demo_run.arch, [30], commit_delay=0.1, gap=0.0)
    watcher = Watcher(demo_run.checkpoint_root, FAST, WatchOptions(poll="off", until_pid=trainer.pid, **QUIET))
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    writer.start()
    writer.join(30)
    time.sleep(0.3)
    assert thread.is_alive()  # still watching while the process runs
    trainer.terminate()  # not reaped yet: a zombie counts as ended
    thread.join(30)
    assert not thread.is_alive()
    trainer.wait()
    assert {o.step for o in watcher.outcomes if o.status == "exported"} == {10, 20, 30}


def test_stop_aborts_the_export_in_flight_without_partial_output(demo_run, monkeypatch):
    """The stop comes when the export is complete in its temp dir, report written, one rename from published: it
    stops at the check before the rename (cooperative: nothing is injected into its thread)."""
    from molgen_export.hf import publish

    real_write_json = publish.write_json
    at_publish = threading.Event()

    def stalled_write_json(path, data):
        real_write_json(path, data)
        if path.name == export.REPORT_FILE:
            at_publish.set()
            assert watcher.cancel.wait(30)  # held here until the stop's grace has run out

    monkeypatch.setattr(publish, "write_json", stalled_write_json)
    watcher = Watcher(demo_run.checkpoint_root, FAST, WatchOptions(poll="off", **QUIET))
    watcher.start()
    assert at_publish.wait(30)
    assert list(watcher.export_root.glob(".step-10-hf.tmp-*"))
    watcher.stop(grace=0)
    assert watcher.join(30)
    assert [(o.step, o.status) for o in watcher.outcomes] == [(10, "aborted")]
    assert watcher.outcomes[0].error == "stopped by a signal; nothing was published"
    assert not (watcher.export_root / "step-10-hf").exists()
    assert not list(watcher.export_root.glob(".step-10-hf.tmp-*"))
    assert_no_partial_output(watcher.export_root)
    with publish.try_lock(watcher.export_root / ".step-10-hf.lock") as held:
        assert held  # the export's lock was released


def test_stop_mid_stream_stops_between_pieces_and_releases_everything(demo_run, monkeypatch):
    """Cancelled while the weights stream: the export stops at the next piece, the read-ahead threads end, the
    writer and temp dir go, the lock is free, torch's thread count is the caller's again, and the step exports in
    full on the next run."""
    import torch

    from molgen_export.errors import ExportAborted
    from molgen_export.hf import publish, safetensors_writer

    real_write_part = safetensors_writer.SafetensorsWriter.write_part
    streaming = threading.Event()
    returned_at: dict[str, float] = {}

    def stalled_write_part(self, *args, **kwargs):
        real_write_part(self, *args, **kwargs)
        if not streaming.is_set():  # the first piece is written; the readers are ahead
            streaming.set()
            assert watcher.cancel.wait(30)

    def note(outcome):
        returned_at[outcome.status] = time.monotonic()

    monkeypatch.setattr(safetensors_writer.SafetensorsWriter, "write_part", stalled_write_part)
    threads_before = torch.get_num_threads()
    watcher = Watcher(demo_run.checkpoint_root, ExportOptions(threads=threads_before + 1),
                      WatchOptions(poll="off", **QUIET), on_outcome=note)
    seen: list[BaseException] = []
    real_export_step = export.export_step

    def recording_export_step(*args, **kwargs):
        try:
            return real_export_step(*args, **kwargs)
        except ExportAborted as exc:
            seen.append(exc)
            raise

    monkeypatch.setattr(export, "export_step", recording_export_step)
    watcher.start()
    assert streaming.wait(30)
    watcher.stop(grace=0)
    assert watcher.join(30)
    assert [(o.step, o.status) for o in watcher.outcomes] == [(10, "aborted")]
    assert [(e.reason, e.where) for e in seen] == [("stopped by a signal", "between pieces")]
    assert returned_at["aborted"] - watcher.cancel.requested_at < 2.0  # measured about 1 ms on the demo run
    assert not [t.name for t in threading.enumerate() if t.name.startswith("molgen-dcp-reader")]
    assert torch.get_num_threads() == threads_before
    assert not list(watcher.export_root.glob(".step-10-hf*"))  # no temp dir, no output, no lock file
    assert_no_partial_output(watcher.export_root)

    monkeypatch.undo()
    again = Watcher(demo_run.checkpoint_root, FAST, WatchOptions(poll="off", once=True, **QUIET))
    assert {(o.step, o.status) for o in again.run()} == {(10, "exported"), (20, "exported")}


def test_export_step_restores_torch_threads_and_a_requested_token_stops_it_before_any_output(demo_run):
    import torch

    from molgen_export.cancel import CancelToken
    from molgen_export.errors import ExportAborted

    before = torch.get_num_threads()
    options = ExportOptions(skip_logits=True, threads=before + 1)
    token = CancelToken()
    token.request("stopped by a test")
    with pytest.raises(ExportAborted) as caught:
        export.export_step(demo_run.steps[0], options, cancel=token)
    assert (caught.value.reason, caught.value.where) == ("stopped by a test", "start")
    assert torch.get_num_threads() == before
    output_dir = export.output_dir_for(demo_run.steps[0], options)
    assert not list(output_dir.parent.glob(".step-10-hf*")) and not output_dir.exists()

    report = export.export_step(demo_run.steps[0], options, cancel=CancelToken())  # never requested: no effect
    assert report.status == "exported" and torch.get_num_threads() == before


_HELD_BEFORE_PUBLISH = """
import sys, threading
from molgen_export import cancel
from molgen_export.cli import main
from molgen_export.hf import publish
from molgen_export.pipeline import export

requested = threading.Event()
real_request, real_write_json = cancel.CancelToken.request, publish.write_json

def request(self, reason="cancelled"):
    real_request(self, reason)
    requested.set()

def write_json(path, data):  # an export one rename from published waits here for the stop's abort request
    real_write_json(path, data)
    if path.name == export.REPORT_FILE:
        requested.wait(60)

cancel.CancelToken.request, publish.write_json = request, write_json
sys.exit(main(sys.argv[1:]))
"""


def _watch_process(root: Path, *extra: str, held_before_publish: bool = False) -> subprocess.Popen:
    """`molgen-export watch` in a child process; `held_before_publish`: each export waits, complete in its temp
    dir, until the watcher requests its abort (so a stop always finds one to abort)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = ["-c", _HELD_BEFORE_PUBLISH] if held_before_publish else ["-m", "molgen_export"]
    return subprocess.Popen([sys.executable, *command, "watch", str(root), "--poll", "off",
                             "--threads", "1", "--nice", "0", *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_temp_dir(export_root: Path, process: subprocess.Popen) -> Path:
    def temp():
        assert process.poll() is None, process.stdout.read()
        pattern = f".step-*-hf.tmp-{process.pid}-*"
        return next(iter(export_root.glob(pattern)), None) if export_root.is_dir() else None
    return wait_until(temp, 60, "an export in flight", interval=0.005)


@pytest.mark.slow
def test_sigkill_mid_export_then_sigterm_then_restart_leaves_the_full_verified_set(demo_run):
    export_root = Watcher(demo_run.checkpoint_root).export_root
    killed = _watch_process(demo_run.checkpoint_root)
    _wait_for_temp_dir(export_root, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    assert not any(p.name.endswith("-hf") and not (p / export.REPORT_FILE).exists() for p in export_root.iterdir())

    stopped = _watch_process(demo_run.checkpoint_root, "--grace", "0", held_before_publish=True)
    _wait_for_temp_dir(export_root, stopped)
    stopped.send_signal(signal.SIGTERM)
    out, _ = stopped.communicate(timeout=60)
    assert stopped.returncode == 0, out
    outcomes = [line for line in out.splitlines() if line.startswith("step-")]
    assert len(outcomes) == 1 and outcomes[0].split()[1:] == ["aborted", "stopped", "by", "a", "signal;", "nothing",
                                                             "was", "published"], out
    assert "watch ended (inotify): 1 aborted" in out
    assert not list(export_root.glob(f".step-*-hf.tmp-{stopped.pid}-*"))

    restarted = _watch_process(demo_run.checkpoint_root, "--once")
    out, _ = restarted.communicate(timeout=120)
    assert restarted.returncode == 0, out
    assert_no_partial_output(export_root)
    for step in (10, 20):
        report = json.loads((export_root / f"step-{step}-hf" / export.REPORT_FILE).read_text())
        assert report["status"] == "exported" and report["fidelity"]["max_abs_diff"] <= 1e-3  # fully verified
    assert all(n == 1 for n in exported_counts(export_root).values())
    assert set(exported_counts(export_root)) == {10, 20}


def test_cli_once_prints_a_line_per_step_and_exits_1_when_a_step_gives_up(demo_run, capsys):
    from molgen_export import cli

    shard = next((demo_run.checkpoint_root / "step-20").glob("*.distcp"))
    shard.write_bytes(b"")
    code = cli.main(["watch", str(demo_run.checkpoint_root), "--once", "--skip-logits", "--retries", "0",
                     "--nice", "0", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 1
    assert "step-10  ok" in out and "step-20  gave-up" in out and "watch ended (scan): 1 exported, 1 gave-up" in out
    assert cli.main(["watch", str(demo_run.checkpoint_root), "--poll", "sometimes"]) == 2


def test_on_export_hooks_run_at_the_watchers_lower_priority(tmp_path):
    """An lm-eval run after each export must not take the CPU from training: hooks get the watcher's `nice`."""
    from molgen_export.watch.on_export import ExportHooks

    base = os.nice(0)
    hooks = ExportHooks('{python} -c "import os; print(os.nice(0))"', tmp_path, 30, lambda: False, nice=5)
    hooks.run(10, tmp_path / "step-10", tmp_path / "step-10-hf")
    (entry,) = [e for e in read_journal(tmp_path) if e.get("exit_code") is not None]
    assert int(entry["output_tail"].split()[-1]) == min(19, base + 5)
