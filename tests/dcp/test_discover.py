"""dcp.discover: what the user points at (step folder, checkpoint root, run root, one `.distcp` file) becomes
step folders, numbered as numbers, each with the format its files show; only a step with `.metadata` is complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from molgen_export.dcp import discover
from molgen_export.demo import save_dcp
from molgen_export.errors import CheckpointFormatError, CheckpointNotReadyError, UsageError


def _save(step_dir: Path) -> Path:
    """A real (tiny) DCP save: shards, then `.metadata` renamed into place."""
    save_dcp({"tok_embeddings.weight": torch.randn(8, 4), "train_state": {"step": 1}}, step_dir)
    return step_dir


def _in_progress(step_dir: Path) -> Path:
    """A real save caught before its commit: the shards are there, `.metadata` is not (yet)."""
    _save(step_dir)
    (step_dir / ".metadata").rename(step_dir / ".metadata.tmp")
    return step_dir


@pytest.fixture(scope="module")
def checkpoint_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run") / "checkpoint"
    for step in (100, 2, 10):
        _save(root / f"step-{step}")
    _in_progress(root / "step-20")
    (root / "step-10-hf").mkdir()  # our own output beside the steps: never a step
    (root / ".step-30-hf.tmp-1-abcd").mkdir()
    (root / "step-5").write_text("a file, not a folder")
    (root / "config.json").write_text("{}")
    return root


def test_steps_ordered_by_number_not_by_name(checkpoint_root):
    steps = discover.list_steps(checkpoint_root)
    assert [s.step for s in steps] == [2, 10, 20, 100]  # as strings, "100" < "2"
    assert all(s.step_dir == checkpoint_root / f"step-{s.step}" for s in steps)
    assert all(s.checkpoint_root == checkpoint_root for s in steps)


def test_an_incomplete_step_is_listed_but_not_complete(checkpoint_root):
    steps = {s.step: s for s in discover.list_steps(checkpoint_root)}
    assert steps[20].format == "dcp-in-progress" and not steps[20].complete
    assert [s for s, info in steps.items() if info.complete] == [2, 10, 100]
    with pytest.raises(CheckpointNotReadyError, match=r"no \.metadata yet") as info:
        discover.require_dcp(steps[20])
    assert info.value.path == checkpoint_root / "step-20"
    discover.require_dcp(steps[10])  # complete: no exception


def test_the_commit_marker_makes_a_step_complete(tmp_path):
    step_dir = _in_progress(tmp_path / "step-7")
    assert discover.describe_step(step_dir).format == "dcp-in-progress"
    (step_dir / ".metadata.tmp").rename(step_dir / ".metadata")
    assert discover.describe_step(step_dir).complete
    empty = tmp_path / "step-8"
    empty.mkdir()  # DCP has not written anything yet
    assert discover.describe_step(empty).format == "dcp-in-progress"


def test_step_number_is_anchored():
    assert discover.step_number(Path("/x/step-42")) == 42
    for name in ("step-42-hf", "step-", "step-4x", "xstep-4", ".step-4-hf.tmp-1-a", "step_4"):
        assert discover.step_number(Path(name)) is None, name
    with pytest.raises(UsageError, match="not a step folder"):
        discover.describe_step(Path("/x/step-4-hf"))


def test_a_step_folder_resolves_to_itself(checkpoint_root):
    root, steps = discover.resolve_checkpoint_root(checkpoint_root / "step-10")
    assert root == checkpoint_root and [s.step for s in steps] == [10]


def test_a_distcp_file_resolves_to_its_step(checkpoint_root):
    shard = sorted((checkpoint_root / "step-10").glob("*.distcp"))[0]
    assert shard.name.startswith("__0_") and shard.name.endswith(".distcp")
    root, steps = discover.resolve_checkpoint_root(shard)
    assert root == checkpoint_root and [(s.step, s.format) for s in steps] == [(10, "dcp")]


def test_a_lone_distcp_file_is_refused(checkpoint_root, tmp_path):
    shard = sorted((checkpoint_root / "step-10").glob("*.distcp"))[0]
    lone = tmp_path / shard.name
    lone.write_bytes(shard.read_bytes())
    with pytest.raises(CheckpointFormatError, match="cannot be read on its own") as info:
        discover.resolve_checkpoint_root(lone)
    assert "step-N folder" in info.value.hint
    with pytest.raises(UsageError, match="not a .distcp shard"):
        discover.resolve_checkpoint_root(checkpoint_root / "step-10" / ".metadata")


def test_run_roots_resolve_to_their_checkpoint_folder(checkpoint_root, tmp_path):
    root, steps = discover.resolve_checkpoint_root(checkpoint_root.parent)  # `checkpoint/` by convention
    assert root == checkpoint_root and [s.step for s in steps] == [2, 10, 20, 100]
    run = tmp_path / "custom_run"
    _save(run / "ckpts" / "step-3")
    (run / "job_config.json").write_text(json.dumps({"checkpoint": {"folder": "ckpts"}}))
    root, steps = discover.resolve_checkpoint_root(run)
    assert root == run / "ckpts" and [s.step for s in steps] == [3]


def test_nothing_to_resolve(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        discover.resolve_checkpoint_root(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no step-N checkpoint folder"):
        discover.resolve_checkpoint_root(tmp_path / "empty")


@pytest.mark.parametrize(("files", "fmt", "error"), [
    (["model-00001-of-00002.safetensors", "model.safetensors.index.json"], "hf", "HuggingFace safetensors"),
    (["model_0.pt", "optimizer_0.pt", "metadata.pkl"], "torch_checkpointing", "torch_checkpointing backend"),
    (["notes.txt"], "unknown", "holds no DCP checkpoint"),
])
def test_other_formats_are_named(tmp_path, files, fmt, error):
    step_dir = tmp_path / "step-10"
    step_dir.mkdir()
    for name in files:
        (step_dir / name).write_text("")
    info = discover.describe_step(step_dir)
    assert info.format == fmt and not info.complete
    with pytest.raises(CheckpointFormatError, match=error):
        discover.require_dcp(info)
