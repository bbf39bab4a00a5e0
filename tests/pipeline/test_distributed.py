"""`--distributed` under torchrun (2 gloo ranks on CPU): byte-identical to one process; any rank's failure
publishes nothing (issue 8)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.procs import run_group

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_rank_export_is_byte_identical_to_one_process(demo_run, tmp_path):
    step = demo_run.steps[-1]
    common = ["--dcp-path", str(step), "--max-shard-size", "60KB"]
    run_group(TORCHRUN + ["-m", "molgen_export", *common, "--distributed", "--output", str(tmp_path / "two")],
              timeout=300, env=ENV)
    subprocess.run([sys.executable, "-m", "molgen_export", *common, "--output", str(tmp_path / "one")], check=True,
                   timeout=300, env=ENV)
    one, two = tmp_path / "one" / "step-20-hf", tmp_path / "two" / "step-20-hf"
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 2  # the ranks really split the files
    for name in names:
        if name != "export_report.json":  # the report carries timings
            assert (one / name).read_bytes() == (two / name).read_bytes(), name


@pytest.mark.slow
def test_a_failing_rank_aborts_every_rank_and_publishes_nothing(demo_run, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(subprocess.CalledProcessError) as info:
        run_group(TORCHRUN + [str(REPO / "tests" / "helpers" / "distributed_fail.py"), "--dcp-path",
                              str(demo_run.steps[0]), "--distributed", "--output", str(out), "--max-shard-size",
                              "60KB"], timeout=300, env=ENV)
    assert b"injected on rank 1" in info.value.stderr
    assert [p.name for p in out.iterdir() if not p.name.endswith(".lock")] == []
