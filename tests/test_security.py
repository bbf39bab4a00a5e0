"""Untrusted checkpoint folders never run code or make the export read or write outside its folders."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest

from molgen_export.cli import main
from molgen_export.errors import ConfigError, UnsafeCheckpointError
from molgen_export.export import export_step, plan_step

PACKAGE = Path(__file__).resolve().parents[1] / "molgen_export"


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
