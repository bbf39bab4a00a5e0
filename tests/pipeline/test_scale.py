"""Scale without data (issue 14): a Qwen3-235B-A22B-shaped step, planned in seconds, in linear time.

The step is synthetic (`tests/helpers/synthetic_235b.py`): real DCP `.metadata` of an 8-rank FSDP2 save of
torchtitan's own 235B-A22B (94 layers, 128 grouped experts, AdamW state), sparse shard files of 2.8 TB
apparent size taking no disk. Figures go to stdout (`pytest -s`) and docs/PERFORMANCE.md.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from molgen_export.dcp import discover
from molgen_export.pipeline import export
from molgen_export.pipeline import weight_stream
from molgen_export.pipeline.plan import plan_dcp_step
from molgen_export.pipeline.timing import Timer
from molgen_export.hf import safetensors_writer
from molgen_export.options import ExportOptions
from tests.helpers.synthetic_235b import REGISTRY_LAYERS, make_synthetic_step

REPO = Path(__file__).resolve().parents[2]
DRY_RUN_SECONDS = 5.0
"""Issue 14's target; the test xfails above it (a loaded machine) and fails above the ceiling."""
DRY_RUN_CEILING_SECONDS = 30.0
DRY_RUN_RSS_BYTES = 1 << 30
PLAN_SECONDS = 10.0
MAX_CALLS_RATIO_4X = 4.4
"""Python calls made planning 4x the layers, against 1x (linear: 4, quadratic: 16). Counted, so free of noise."""
MAX_LAST_DOUBLING = 3.0
"""Wall time of the largest size against the one half its size (linear: 2, quadratic: 4).

Only the last doubling is timed against a bound: between the smaller sizes the unpickler's working set leaves the
CPU caches, and one doubling there was measured at x3.49 on CI (32 -> 64 layers, 0.73 s -> 2.53 s) while the next
was x1.88 (-> 4.76 s): a step in memory speed, not a trend in the code. A quadratic term, where it matters, is
largest at the largest size."""
SCALE_LAYERS = (32, 64, 128)


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


@pytest.fixture(scope="module")
def step_235b(tmp_path_factory):
    return make_synthetic_step(tmp_path_factory.mktemp("qwen3-235b"), REGISTRY_LAYERS, ranks=8)


def test_synthetic_step_is_a_dcp_checkpoint_without_data(step_235b):
    """DCP's own reader takes the metadata; the shards have the sizes it names and hold no blocks."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    metadata = FileSystemReader(str(step_235b.step_dir)).read_metadata()
    md = metadata.state_dict_metadata
    w1 = md["layers.93.moe.routed_experts.inner_experts.w1_EFD"]
    assert isinstance(w1, TensorStorageMetadata) and tuple(w1.size) == (128, 1536, 4096)
    assert [tuple(c.offsets) for c in w1.chunks] == [(16 * r, 0, 0) for r in range(8)]
    assert tuple(md["layers.0.moe.routed_experts.inner_experts.w2_EDF"].size) == (128, 4096, 1536)
    assert tuple(md["tok_embeddings.weight"].size) == tuple(md["lm_head.weight"].size) == (151936, 4096)
    assert tuple(md["layers.5.attention.qkv_linear.wk.weight"].size) == (512, 4096)
    assert tuple(md["optimizer.state.layers.5.attention.qkv_linear.wqkv.weight.exp_avg"].size) == (9216, 4096)
    assert isinstance(md["optimizer.param_groups.norm.weight.lr"], BytesStorageMetadata)
    assert len(md["layers.7.moe.expert_bias_E"].chunks) == 1  # a buffer: replicated, saved once
    assert metadata.planner_data["optimizer.state.norm.weight.exp_avg"] == ("optimizer", "state.norm.weight.exp_avg")
    assert step_235b.model_tensors == 3 + 13 * REGISTRY_LAYERS
    # every stored item lies inside its shard file; the files take (almost) no disk
    for index, info in metadata.storage_data.items():
        assert info.offset + info.length <= step_235b.files[info.relative_path], index
    used = 0
    for name, size in step_235b.files.items():
        stat = (step_235b.step_dir / name).stat()
        assert stat.st_size == size
        used += stat.st_blocks * 512
    assert step_235b.apparent_bytes > 2.5e12 and used < 1 << 20


def test_dry_run_of_235b_in_seconds_and_under_1gb(step_235b):
    """`--dry-run` in a fresh process, as `python -m molgen_export` runs it (no interpreter teardown): exit 0,
    wall and peak RSS of that process measured, and none of torchtitan's model code imported (the run config
    carries its model config: fields are decided on the dict and names come from the table)."""
    command = ("import os, sys; from molgen_export.cli import main; code = main(sys.argv[1:]); "
               "sys.stdout.flush(); sys.stderr.write('\\nTITAN ' + ' '.join(sorted(m for m in sys.modules "
               "if m.startswith('torchtitan')))); sys.stderr.flush(); os._exit(code)")
    probe = ("import resource, subprocess, sys, time, json\n"
             "t = time.perf_counter()\n"
             f"p = subprocess.run([sys.executable, '-c', {command!r}, '--dcp-path', sys.argv[1], '--dry-run'], "
             "capture_output=True, text=True)\n"
             "wall = time.perf_counter() - t\n"
             "print(json.dumps({'rc': p.returncode, 'wall': wall, 'out': p.stdout, 'err': p.stderr[-3000:], "
             "'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n")
    result = subprocess.run([sys.executable, "-c", probe, str(step_235b.step_dir)], capture_output=True, text=True,
                            cwd=REPO, check=True)
    figures = json.loads(result.stdout)
    assert figures["rc"] == 0, figures["err"]
    assert "1225 (940.39 GB), -> 36945 HF tensors" in figures["out"]
    assert "names from molgen's table" in figures["out"]
    imported = figures["err"].rsplit("TITAN", 1)[1].split()
    assert not [m for m in imported if m.startswith("torchtitan.models")], imported
    rss = figures["maxrss_kb"] * 1024
    print(f"\n235B dry run: {figures['wall']:.2f} s wall, peak RSS {rss / 2**20:.0f} MiB, load {_loadavg()}")
    assert rss <= DRY_RUN_RSS_BYTES
    assert figures["wall"] <= DRY_RUN_CEILING_SECONDS
    if figures["wall"] > DRY_RUN_SECONDS:  # a machine too loaded to tell; reported, not hidden
        pytest.xfail(f"235B dry run took {figures['wall']:.2f} s at load {_loadavg()}, target {DRY_RUN_SECONDS:.0f} s "
                     "(met on this machine at load below 1; docs/PERFORMANCE.md)")


def _plan_and_shards(step_dir: Path, options: ExportOptions):
    """Discovery, the export's own plan (keys, mapping, checks) and its shard plan, as an export makes them."""
    root, steps = discover.resolve_checkpoint_root(step_dir)
    assert [s.step_dir for s in steps] == [step_dir] and steps[0].complete
    report = export.ExportReport(step=steps[0].step, step_dir=str(step_dir), output_dir="", versions={},
                                 options={})
    plan = plan_dcp_step(step_dir, options, report, Timer(report.timings))
    heads = (plan.arch.n_heads, plan.arch.n_kv_heads, plan.arch.head_dim)
    streamer = weight_stream.WeightStreamer(plan.meta, plan.sources, plan.mapping, plan.export_dtype, heads,
                                            None, None)
    planned = streamer.planned(tie=False)  # the run unties: embedding and head are both written
    return plan, planned, safetensors_writer.plan_shards(planned, options.max_shard_bytes)


def test_export_plan_of_235b_in_seconds(step_235b):
    """The dry-run report, and the plan an export makes (discovery, keys, mapping, checks, 5 GB shard plan).

    Shards: 470 GB of bf16 in 5 GB files is 95 (the bound is ceil(bytes / 5 GB) = 95, and every tensor is
    far below 5 GB so the packing loses nothing). The ~118 of the issue is Qwen's own release, which was cut
    at 4 GB: the same plan at 4 GB gives 118 (asserted below, so the count is explained, not guessed).
    """
    options = ExportOptions(dry_run=True)
    started = time.perf_counter()
    report = export.plan_step(step_235b.step_dir, options)
    plan_step_seconds = time.perf_counter() - started
    assert report.status == "planned" and all(f["ok"] for f in report.findings), report.findings
    assert report.tensors == 1225 and report.hf_tensors == 36945

    started = time.perf_counter()
    plan, planned, shards = _plan_and_shards(step_235b.step_dir, options)
    plan_seconds = time.perf_counter() - started
    assert len(plan.mapping) == len(planned) == 36945
    assert plan.mapping["layers.93.moe.routed_experts.inner_experts.w2_EDF#127"] == \
        "model.layers.93.mlp.experts.127.down_proj.weight"
    assert sorted(plan.training_buffers) == sorted(f"layers.{i}.moe.expert_bias_E" for i in range(94))
    hf_bytes = sum(t.nbytes for t in planned)
    assert hf_bytes == sum(math.prod(s.shape) for s in plan.sources.values()) * 2
    # every tensor exactly once, no shard over 5 GB (no single tensor is larger), the sizes add up
    assert sorted(t.hf_key for s in shards for t in s.tensors) == sorted(t.hf_key for t in planned)
    assert all(s.size - len(s.header) <= options.max_shard_bytes for s in shards)
    assert sum(s.size - len(s.header) for s in shards) == hf_bytes
    assert len(shards) == math.ceil(hf_bytes / options.max_shard_bytes) == 95
    at_4gb = safetensors_writer.plan_shards(planned, 4 * 10**9)
    assert len(at_4gb) == 118
    print(f"\n235B plan: {plan_seconds:.2f} s (discovery, plan, shard plan; plan_step alone {plan_step_seconds:.2f} s), "
          f"{len(planned)} HF tensors, {hf_bytes / 1e9:.2f} GB bf16 in {len(shards)} shards of <= 5 GB "
          f"({len(at_4gb)} at 4 GB), load {_loadavg()}")
    assert plan_seconds <= PLAN_SECONDS
    assert plan_step_seconds <= PLAN_SECONDS


def _python_calls(fn) -> int:
    """How many Python-level calls (and calls into C) `fn()` makes: a count of work that load cannot change."""
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        if event == "call" or event == "c_call":
            calls += 1

    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.slow
def test_discovery_and_planning_are_not_quadratic(tmp_path):
    """Plan 1x, 2x and 4x the layers: the work must grow linearly, not with the square.

    Two measures: the number of calls made (exact, so the bound is tight) and wall time (which also sees a
    quadratic loop inside one C call, e.g. `list.index` per key). Rounds interleave the sizes and each size keeps
    its best round, so a burst of load from other processes on this shared machine lands on one round, not on
    one size.
    """
    import gc

    options = ExportOptions(dry_run=True)
    steps = {n: make_synthetic_step(tmp_path / f"L{n}", n, ranks=8).step_dir for n in SCALE_LAYERS}
    _plan_and_shards(steps[SCALE_LAYERS[0]], options)  # warm: imports, registry, first-call caches
    seconds = dict.fromkeys(SCALE_LAYERS, math.inf)
    for _ in range(3):
        for n, step_dir in steps.items():
            gc.collect()
            started = time.perf_counter()
            plan, planned, shards = _plan_and_shards(step_dir, options)
            seconds[n] = min(seconds[n], time.perf_counter() - started)
            assert plan.arch.n_layers == n and len(planned) == 3 + n * (9 + 3 * 128)
            del plan, planned, shards
    small, half, large = SCALE_LAYERS
    calls = {n: _python_calls(lambda: _plan_and_shards(steps[n], options)) for n in (small, large)}
    calls_ratio = calls[large] / calls[small]
    last_doubling = seconds[large] / seconds[half]
    print("\nplanning vs layers: " + ", ".join(f"{n} layers {seconds[n]:.2f} s" for n in seconds)
          + f" (last doubling x{last_doubling:.2f}); calls {calls[small]} -> {calls[large]} (x{calls_ratio:.2f} "
          f"for x{large // small} the layers), load {_loadavg()}")
    assert calls_ratio <= MAX_CALLS_RATIO_4X, calls
    assert last_doubling <= MAX_LAST_DOUBLING, seconds


def test_builder_lays_metadata_out_as_dcp_save_does(tmp_path):
    """Same state dict shapes, one rank: the builder's `.metadata` equals what a real `dcp.save` wrote."""
    from torch.distributed.checkpoint import FileSystemReader

    import torch

    from molgen_export.demo import build_model, save_dcp, titan_checkpoint_state, tiny_moe_arch
    from tests.helpers.synthetic_235b import ADAMW_GROUP, build_metadata

    model = build_model(tiny_moe_arch(moe_layers=(1,)))
    optimizer = torch.optim.AdamW(model.parameters(), **{k: ADAMW_GROUP[k] for k in ("lr", "betas", "eps",
                                                                                      "weight_decay")})
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    real_dir = tmp_path / "real" / "step-7"
    save_dcp(titan_checkpoint_state(model, optimizer, 7), real_dir)
    real = FileSystemReader(str(real_dir)).read_metadata()  # torch's own reader of the file dcp.save just wrote

    state = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    params = {k: tuple(v.shape) for k, v in model.named_parameters()}
    ours, files = build_metadata(real_dir, state, params, step=7, ranks=1, scratch=tmp_path)
    assert ours.state_dict_metadata == real.state_dict_metadata
    assert list(ours.state_dict_metadata) == list(real.state_dict_metadata)
    assert ours.planner_data == real.planner_data
    assert list(ours.storage_data.items()) == list(real.storage_data.items())
    assert [i.index for i in ours.storage_data] == [i.index for i in real.storage_data]
    assert files == {"__0_0.distcp": (real_dir / "__0_0.distcp").stat().st_size}
    assert (ours.version, ours.storage_meta.checkpoint_id) == (real.version, real.storage_meta.checkpoint_id)
