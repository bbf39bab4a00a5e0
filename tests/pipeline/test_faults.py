"""Faults survived with real processes: SIGKILL at random points of an export never leaves a partial `*-hf`."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from molgen_export.options import ExportOptions
from molgen_export.pipeline.export import REPORT_FILE, export_step, output_dir_for

LOOPING_EXPORTER = """
import sys, time
from pathlib import Path
from molgen_export.options import ExportOptions
from molgen_export.pipeline.export import export_step
step = Path(sys.argv[1])
# warm up (imports of torchtitan and transformers happen inside the first export), so the kills that follow
# land in reading, checking, writing, verifying and publishing rather than in imports
export_step(step, ExportOptions(force=True, max_shard_size="150KB"))
print("READY", flush=True)
i = 0
while True:
    export_step(step, ExportOptions(force=True, skip_logits=bool(i % 2), max_shard_size="150KB"))
    print("DONE", i, flush=True)
    i += 1
"""

COMPLETE = {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            REPORT_FILE, "README.md"}


def assert_no_partial_export(export_root: Path) -> None:
    """Every visible entry of the export root is a complete, verified export."""
    if not export_root.exists():
        return
    for entry in export_root.iterdir():
        if entry.name.startswith("."):  # hidden temporary folders and locks
            continue
        names = {p.name for p in entry.iterdir()}
        assert COMPLETE <= names, f"{entry} is incomplete: {sorted(names)}"
        report = json.loads((entry / REPORT_FILE).read_text())
        index = json.loads((entry / "model.safetensors.index.json").read_text())
        assert report["status"] == "exported" and set(index["weight_map"].values()) <= names


@pytest.mark.slow
def test_random_sigkills_never_publish_a_partial_export(demo_run):
    step = demo_run.steps[0]
    export_root = output_dir_for(step, ExportOptions()).parent
    rng = random.Random(7)
    kills = 0
    completed_before_kill = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", LOOPING_EXPORTER, str(step)], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "READY"
        time.sleep(rng.uniform(0.0, 1.2))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        completed_before_kill += out.count("DONE")
        kills += 1
        assert_no_partial_export(export_root)
    assert kills == 6
    # the next run cleans up after the dead ones and completes
    report = export_step(step, ExportOptions(max_shard_size="150KB", force=True))
    assert report.status == "exported" and report.fidelity["passed"]
    assert_no_partial_export(export_root)
    assert [p.name for p in export_root.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []
    print(f"{kills} kills, {completed_before_kill} exports completed between them")
