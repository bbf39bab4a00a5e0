"""Untrusted checkpoint folders never run code or make the export read or write outside its folders."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from molgen_export.pipeline import export
from molgen_export.cli import main
from molgen_export.options import ExportOptions
from molgen_export.dcp.metadata import shard_name_problem
from molgen_export.dcp.read import read_step_metadata
from molgen_export.errors import ConfigError, UnsafeCheckpointError
from molgen_export.pipeline.export import export_step, plan_step

PACKAGE = Path(__file__).resolve().parents[2] / "molgen_export"


class _RunsCode:
    """Unpickling this calls os.system: what a crafted .metadata would do to torch's own reader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_metadata_is_refused_on_every_path(demo_run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    step = demo_run.steps[0]
    (step / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system"):
        export_step(step)
    with pytest.raises(UnsafeCheckpointError):
        plan_step(step)
    assert main(["--dcp-path", str(step), "--dry-run"]) == 2
    assert "refusing to unpickle" in capsys.readouterr().err
    assert not marker.exists()


def test_metadata_naming_a_torch_function_is_refused(demo_run):
    """Only torch dtypes and DCP classes pass, not arbitrary torch callables."""
    import torch

    class _CallsTorchLoad:
        def __reduce__(self):
            return (torch.load, ("/etc/hostname",))

    step = demo_run.steps[0]
    (step / ".metadata").write_bytes(pickle.dumps(_CallsTorchLoad()))
    with pytest.raises(UnsafeCheckpointError, match="torch.serialization.load"):
        export_step(step)


def test_tokenizer_symlink_out_of_assets_is_refused(demo_run, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy me")
    (demo_run.assets_dir / "merges.txt").symlink_to(secret)
    with pytest.raises(ConfigError, match="outside the assets folder"):
        export_step(demo_run.steps[0])


def test_only_allow_listed_asset_files_are_copied(demo_run):
    (demo_run.assets_dir / "modeling_evil.py").write_text("import os; os.system('echo hi')")
    (demo_run.assets_dir / "model.safetensors").write_bytes(b"stale base weights")
    report = export_step(demo_run.steps[0])
    names = {p.name for p in Path(report.output_dir).iterdir()}
    assert "modeling_evil.py" not in names
    assert (Path(report.output_dir) / "model.safetensors").read_bytes() != b"stale base weights"


def test_no_unsafe_loading_in_the_package():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            call = text[match.start():end + 1]
            assert "weights_only=True" in call, (path, call)
        assert not re.search(r"(?<![_\w])pickle\.loads?\(", text), path


# -- shard paths from .metadata stay inside the step folder ------------------------------------------------------

def _repickle_storage_paths(step: Path, new_path) -> None:
    """Rewrite `.metadata` with every storage entry's `relative_path` replaced by `new_path(old)`: the genuine file is
    loaded by torch's own reader (this test made it: trusted), edited, and pickled again."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(step)).read_metadata()
    for info in metadata.storage_data.values():
        info.relative_path = new_path(info.relative_path)
    (step / ".metadata").write_bytes(pickle.dumps(metadata))


def _outside_copy(step: Path, tmp_path: Path) -> Path:
    """The step's shard copied outside the step folder, and the step's own shard deleted (the reported attack)."""
    outside = tmp_path / "elsewhere" / "__0_0.distcp"
    outside.parent.mkdir()
    shutil.copy(step / "__0_0.distcp", outside)
    (step / "__0_0.distcp").unlink()
    return outside


def _absolute(step, tmp_path):
    outside = _outside_copy(step, tmp_path)
    _repickle_storage_paths(step, lambda _: str(outside))
    return "absolute"


def _dotdot(step, tmp_path):
    _outside_copy(step, tmp_path)
    _repickle_storage_paths(step, lambda name: f"../../../elsewhere/{name}")
    return "a path, not a plain file name"


def _subfolder(step, tmp_path):
    (step / "sub").mkdir()
    (step / "__0_0.distcp").rename(step / "sub" / "__0_0.distcp")
    _repickle_storage_paths(step, lambda name: f"sub/{name}")
    return "a path, not a plain file name"


def _nul(step, tmp_path):
    _repickle_storage_paths(step, lambda name: name + "\x00.txt")
    return "control character"


def _symlink_out(step, tmp_path):
    (step / "__0_0.distcp").symlink_to(_outside_copy(step, tmp_path))
    return "outside the step folder"


def _fifo(step, tmp_path):
    (step / "__0_0.distcp").unlink()
    os.mkfifo(step / "__0_0.distcp")  # opening it for reading would block for ever
    return "not a regular file"


PATH_ATTACKS = [_absolute, _dotdot, _subfolder, _nul, _symlink_out, _fifo]


@pytest.mark.parametrize("attack", PATH_ATTACKS, ids=lambda a: a.__name__.strip("_"))
def test_shard_paths_outside_the_step_are_refused_everywhere(attack, demo_run, tmp_path, capsys):
    step = demo_run.steps[0]
    words = attack(step, tmp_path)
    export_root = demo_run.checkpoint_root.parent / f"{demo_run.checkpoint_root.name}-hf"
    with pytest.raises(UnsafeCheckpointError, match="refusing to read it") as refused:
        export_step(step, ExportOptions(skip_logits=True))
    assert words in str(refused.value) and "stores `" in str(refused.value), str(refused.value)  # names the entry
    assert main(["--dcp-path", str(step), "--skip-logits"]) == 2
    assert main(["--dcp-path", str(step), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("refusing to read it") == 2 and words in err, err
    (demo_run.steps[1] / ".metadata").unlink()  # the watcher's only complete step is this one
    assert main(["watch", str(demo_run.checkpoint_root), "--once", "--retries", "0", "-q", "--skip-logits"]) == 1
    assert "refusing to read it" in (export_root / ".step-10-hf.failed.json").read_text()
    assert not list(export_root.glob("step-*-hf")), "nothing is published"
    assert export.source_fingerprint(step)  # the watcher's failure record still gets one


def test_shard_name_checks_are_exact():
    for good in ("__0_0.distcp", "__12_3.distcp", "shard with spaces.bin", ".hidden"):
        assert shard_name_problem(good) is None, good
    for bad in ("", ".", "..", "/etc/passwd", "../x", "a/b", "a\\b", "a\x00b", "a\nb", "x" * 300, 7, None, b"x"):
        assert shard_name_problem(bad), bad


def test_symlink_inside_the_step_is_followed(demo_run):
    step = demo_run.steps[0]
    reference = read_step_metadata(step)
    fqn = next(iter(reference.model))
    expected = reference.read(fqn)
    (step / "data").mkdir()
    (step / "__0_0.distcp").rename(step / "data" / "__0_0.distcp")
    (step / "__0_0.distcp").symlink_to(Path("data") / "__0_0.distcp")
    assert torch.equal(read_step_metadata(step).read(fqn), expected)


def test_shard_swapped_for_a_symlink_after_the_metadata_was_read_is_refused(demo_run, tmp_path):
    step = demo_run.steps[0]
    meta = read_step_metadata(step)
    (step / "__0_0.distcp").symlink_to(_outside_copy(step, tmp_path))
    with pytest.raises(UnsafeCheckpointError, match="outside the step folder"):
        meta.read(next(iter(meta.model)))


def test_fingerprint_covers_every_file_the_metadata_names(demo_run):
    step = demo_run.steps[0]
    genuine = hashlib.sha256((step / ".metadata").read_bytes())
    for path in sorted(step.glob("*.distcp")):
        genuine.update(f"{path.name}:{path.stat().st_size}".encode())
    assert export.source_fingerprint(step) == genuine.hexdigest()  # unchanged for DCP's own layout
    (step / "__0_0.distcp").rename(step / "weights.bin")
    _repickle_storage_paths(step, lambda _: "weights.bin")
    before = export.source_fingerprint(step)
    assert read_step_metadata(step).files == {"weights.bin": (step / "weights.bin").stat().st_size}
    with open(step / "weights.bin", "ab") as f:
        f.write(b"\0")
    assert export.source_fingerprint(step) != before  # a glob of *.distcp would not have seen it
    (step / "weights.bin").unlink()
    assert export.source_fingerprint(step) != before


def test_metadata_that_is_not_a_regular_file_is_refused_without_blocking(demo_run, capsys):
    step = demo_run.steps[0]
    (step / ".metadata").unlink()
    os.mkfifo(step / ".metadata")  # reading it would wait for a writer for ever
    assert main(["--dcp-path", str(step), "--dry-run"]) == 2
    assert "is not a regular file" in capsys.readouterr().err
    assert export.source_fingerprint(step)
    assert export.export_state(step, ExportOptions()) == "missing"
