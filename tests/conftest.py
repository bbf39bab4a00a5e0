"""Shared fixtures: tiny real TorchTitan Qwen3 runs saved with torch.distributed.checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def demo_run_session(tmp_path_factory):
    """A tied, vocab-padded tiny run with steps 10 and 20, made once per session. Do not modify it."""
    from molgen_export.demo import make_demo_run

    return make_demo_run(tmp_path_factory.mktemp("demo-session"), steps=(10, 20))


@pytest.fixture
def demo_run(demo_run_session, tmp_path):
    """A private copy of the session demo run (tests may write, break or delete it)."""
    from molgen_export.demo import DemoRun

    workdir = tmp_path / "work"
    shutil.copytree(demo_run_session.workdir, workdir, symlinks=True)
    run = DemoRun(workdir=workdir, run_dir=workdir / "run", checkpoint_root=workdir / "run" / "checkpoint",
                  assets_dir=workdir / "assets", job_config=workdir / "run" / "job_config.json",
                  steps=[workdir / "run" / "checkpoint" / p.name for p in demo_run_session.steps],
                  tokenizer_size=demo_run_session.tokenizer_size, arch=demo_run_session.arch)
    # the runner config records absolute paths; point them at the copy
    from molgen_export.mapping.run_config import write_checkpoint_config

    write_checkpoint_config(run.checkpoint_root, run.job_config, launch_dir=workdir)
    return run


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
