"""hf.publish: a folder appears at its final path by one rename or not at all (a writer killed mid-way leaves
nothing there), temporaries of dead writers are cleaned and those of live ones kept, and the folder lock excludes
a second process and is freed when its holder dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from molgen_export.errors import OutputError, StepLockedError
from molgen_export.hf import publish

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _temps(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if publish.is_temp_name(p.name))


def test_a_writer_killed_before_the_rename_leaves_nothing_at_the_final_path(tmp_path):
    final = tmp_path / "step-10-hf"
    child = _python("""
        import os, signal, sys
        from pathlib import Path
        from molgen_export.hf import publish
        final = Path(sys.argv[1])
        with publish.folder_lock(final), publish.staged_folder(final) as temp:
            (temp / "model.safetensors").write_bytes(b"x" * 4096)
            (temp / "config.json").write_text("{}")
            os.kill(os.getpid(), signal.SIGKILL)  # killed with every file written, one rename short
        """, str(final))
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert not final.exists()
    leftovers = _temps(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(f".step-10-hf.tmp-{child.pid}-")
    # the next writer cleans the dead one's temporary and publishes
    with publish.folder_lock(final), publish.staged_folder(final) as temp:
        (temp / "config.json").write_text('{"done": true}')
    assert json.loads((final / "config.json").read_text()) == {"done": True}
    assert _temps(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-10-hf"]  # lock file gone too


def test_a_failing_write_keeps_the_old_export_and_removes_its_temporary(tmp_path):
    final = tmp_path / "step-10-hf"
    with publish.staged_folder(final) as temp:
        (temp / "config.json").write_text("old")
    with pytest.raises(RuntimeError, match="verification failed"):
        with publish.staged_folder(final) as temp:
            (temp / "config.json").write_text("new")
            raise RuntimeError("verification failed")
    assert (final / "config.json").read_text() == "old"
    assert _temps(tmp_path) == []


def test_publish_replaces_an_older_export_in_one_rename(tmp_path):
    final = tmp_path / "step-10-hf"
    final.mkdir()
    (final / "stale.safetensors").write_text("old shard")
    temp = publish.make_temp_dir(tmp_path, final.name)
    assert temp.parent == tmp_path and publish.is_temp_name(temp.name)
    (temp / "model.safetensors").write_text("new")
    publish.publish(temp, final)
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors"]  # no stale shard left behind
    assert not temp.exists() and _temps(tmp_path) == []


def test_stale_temporaries_of_dead_pids_removed_live_ones_kept(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # ends, is not reaped until wait()
    try:
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # ended, still a zombie
        assert publish.process_alive(live.pid)
        assert not publish.process_alive(dead.pid)
        assert not publish.process_alive(zombie.pid)
        names = {f".step-10-hf.tmp-{live.pid}-aaaa0000": True, f".step-10-hf.tmp-{dead.pid}-bbbb0000": False,
                 f".step-10-hf.tmp-{zombie.pid}-cccc0000": False, ".step-10-hf.old-dddd0000": False,
                 f".step-100-hf.tmp-{dead.pid}-eeee0000": True,  # another step's: not ours to clean
                 "step-10-hf": True, ".step-10-hf.lock": True}
        for name in names:
            (tmp_path / name).mkdir() if not name.endswith(".lock") else (tmp_path / name).touch()
        assert publish.clean_stale_temp_dirs(tmp_path, "step-10-hf") == 3
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, kept in names.items() if kept)
        live.kill()
        live.wait()
        assert publish.clean_stale_temp_dirs(tmp_path, "step-10-hf") == 1  # its writer is gone now
    finally:
        for proc in (live, zombie):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert publish.clean_stale_temp_dirs(tmp_path / "missing", "step-10-hf") == 0


LOCK_HOLDER = """
    import sys
    from pathlib import Path
    from molgen_export.hf import publish
    with publish.try_lock(Path(sys.argv[1])) as held:
        print("held" if held else "busy", flush=True)
        sys.stdin.readline()
    """


def test_try_lock_excludes_a_second_process(tmp_path):
    lock = tmp_path / ".step-10-hf.lock"
    holder = _python(LOCK_HOLDER, str(lock))
    try:
        assert holder.stdout.readline().strip() == "held"
        with publish.try_lock(lock) as held:
            assert held is False
        other = _python(LOCK_HOLDER, str(lock))
        out, _ = other.communicate("\n", timeout=60)
        assert out.strip() == "busy"
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert not lock.exists()  # removed on release
    with publish.try_lock(lock) as held:
        assert held is True and lock.exists()
    assert not lock.exists()


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    lock = tmp_path / ".step-10-hf.lock"
    holder = _python(LOCK_HOLDER, str(lock))
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    assert lock.exists()  # a killed holder leaves the file ...
    with publish.try_lock(lock) as held:  # ... and the kernel has dropped its lock
        assert held is True
    assert not lock.exists()


def test_folder_lock_raises_when_another_process_writes_the_folder(tmp_path):
    final = tmp_path / "out" / "step-10-hf"
    final.parent.mkdir()
    holder = _python(LOCK_HOLDER, str(final.parent / ".step-10-hf.lock"))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StepLockedError, match="another process") as info:
            with publish.folder_lock(final):
                pass
        assert info.value.path == final
    finally:
        holder.kill()
        holder.wait()
    with publish.folder_lock(final):
        pass


def test_staged_output_refuses_an_existing_folder_without_force(tmp_path):
    output = tmp_path / "converted"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="--force"):
        with publish.staged_output(output, force=False):
            pytest.fail("the block must not run")
    assert (output / "keep.txt").read_text() == "mine"
    with publish.staged_output(output, force=True) as temp:
        (temp / "config.json").write_text("{}")
    assert sorted(p.name for p in output.iterdir()) == ["config.json"]
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OutputError, match="is a file"):
        publish.check_output_dir(tmp_path / "a_file", force=True)
    publish.check_output_dir(tmp_path / "absent", force=False)


def test_write_json_and_copy_files(tmp_path):
    publish.write_json(tmp_path / "a.json", {"b": 1, "a": "é"})
    assert (tmp_path / "a.json").read_text(encoding="utf-8") == '{\n  "b": 1,\n  "a": "é"\n}\n'
    source = tmp_path / "src"
    source.mkdir()
    (source / "tokenizer.json").write_bytes(b'{"x":\r\n 1}\x00')
    target = tmp_path / "dst"
    target.mkdir()
    assert publish.copy_files([source / "tokenizer.json"], target) == ["tokenizer.json"]
    assert (target / "tokenizer.json").read_bytes() == b'{"x":\r\n 1}\x00'  # byte for byte
    with pytest.raises(OutputError):
        publish.copy_files([source / "missing.json"], target)
