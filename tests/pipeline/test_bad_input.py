"""Malformed inputs, each with the error a user sees (the table in docs/RELIABILITY.md), plus property tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from molgen_export.options import ExportOptions
from molgen_export.demo import make_demo_run
from molgen_export.errors import ConfigError, MolgenExportError
from molgen_export.pipeline.export import export_step
from molgen_export.mapping.keymap import WRAPPER_SEGMENTS, canonical_titan_key
from molgen_export.mapping.run_config import parse_run_config
from tests.helpers.titan_version import IS_TITAN021


def _edit_job_config(run, edit) -> None:
    data = json.loads(run.job_config.read_text())
    edit(data)
    run.job_config.write_text(json.dumps(data))
    (run.checkpoint_root / "config.json").unlink()


def _set(path: str, value):
    def edit(data):
        node = data
        *parents, last = path.split(".")
        for key in parents:
            node = node[key] if not key.isdigit() else node[int(key)]
        if value is _DELETE:
            node.pop(last)
        else:
            node[last] = value
    return edit


_DELETE = object()

# (name, edit of the 0.3 job config, expected error type, words the message must contain)
CONFIG_CASES = [
    ("missing hf_assets_path", _set("hf_assets_path", _DELETE), ConfigError, ["hf_assets_path", "--hf-assets"]),
    ("assets path of the wrong type", _set("hf_assets_path", 5), ConfigError, ["not a string"]),
    ("seq_len of the wrong type", _set("training.seq_len", "long"), ConfigError, ["training.seq_len", "'long'"]),
    ("dim of the wrong type", _set("model_spec.model.dim", "64"), ConfigError, ["model dim", "positive integer"]),
    ("negative keep_latest_k", _set("checkpoint.keep_latest_k", -1), ConfigError, ["keep_latest_k"]),
    ("unknown dtype", _set("training.mixed_precision_param", "fp8"), ConfigError, ["mixed_precision_param", "fp8"]),
    ("wrong dims", _set("model_spec.model.layers.0.attention.n_heads", 8), ConfigError, ["n_heads=8", "4"]),
    ("vocab mismatch", _set("model_spec.model.vocab_size", 999), ConfigError, ["vocab_size=999", "320"]),
    ("unknown architecture", _set("model_spec.name", "llama3"), ConfigError, ["llama3", "Qwen3"]),
    ("not a job config", lambda d: d.clear() or d.update({"hello": 1}), ConfigError, ["not a TorchTitan job config"]),
]

# the same for a torchtitan 0.2.1 run (its JobConfig.to_dict(): a flavor, no dims; "wrong dims" is another flavor)
CONFIG_CASES_TITAN021 = [
    ("missing hf_assets_path", _set("model.hf_assets_path", _DELETE), ConfigError, ["hf_assets_path", "--hf-assets"]),
    ("assets path of the wrong type", _set("model.hf_assets_path", 5), ConfigError, ["not a string"]),
    ("seq_len of the wrong type", _set("training.seq_len", "long"), ConfigError, ["training.seq_len", "'long'"]),
    ("negative keep_latest_k", _set("checkpoint.keep_latest_k", -1), ConfigError, ["keep_latest_k"]),
    ("unknown dtype", _set("training.mixed_precision_param", "fp8"), ConfigError, ["mixed_precision_param", "fp8"]),
    ("wrong dims", _set("model.flavor", "debugmodel"), ConfigError, ["vocab_size=2048", "320"]),
    ("unknown architecture", _set("model.name", "llama3"), ConfigError, ["llama3", "Qwen3"]),
    ("not a job config", lambda d: d.clear() or d.update({"hello": 1}), ConfigError, ["not a TorchTitan job config"]),
]
if IS_TITAN021:
    CONFIG_CASES = CONFIG_CASES_TITAN021


@pytest.mark.parametrize("name, edit, error, words", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_run_config(demo_run, name, edit, error, words):
    _edit_job_config(demo_run, edit)
    with pytest.raises(error) as info:
        export_step(demo_run.steps[0])
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert not (demo_run.run_dir / "checkpoint-hf" / "step-10-hf").exists()


def test_job_config_not_json(demo_run):
    demo_run.job_config.write_text("{not json")
    (demo_run.checkpoint_root / "config.json").unlink()
    with pytest.raises(ConfigError, match="not valid JSON"):
        export_step(demo_run.steps[0])


def test_base_assets_of_another_family(demo_run):
    config = json.loads((demo_run.assets_dir / "config.json").read_text())
    config["model_type"] = "llama"
    (demo_run.assets_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="`llama` model"):
        export_step(demo_run.steps[0])


def test_keys_from_another_model_family(tmp_path):
    """A Llama-style checkpoint (no q_norm/k_norm) is not taken for a Qwen3."""

    def drop_qk_norm(state):
        for key in [k for k in state if "q_norm" in k or "k_norm" in k]:
            del state[key]

    run = make_demo_run(tmp_path, steps=(5,), mutate=drop_qk_norm)
    with pytest.raises(ConfigError, match="q_norm"):
        export_step(run.steps[0])


def test_mixed_dtypes_across_tensors(tmp_path):
    def mix(state):
        for key in ("layers.0.feed_forward.w1.weight", "norm.weight"):
            state[key] = state[key].to(torch.bfloat16)

    run = make_demo_run(tmp_path, steps=(5,), mutate=mix)
    report = export_step(run.steps[0])
    assert report.checkpoint_dtype == "bfloat16,float32" and report.fidelity["passed"]


def test_step_folder_with_extra_files(demo_run):
    step = demo_run.steps[0]
    (step / "notes.txt").write_text("hello")
    (step / "sharded").mkdir()
    (step / "sharded" / "model.safetensors").write_bytes(b"junk")
    report = export_step(step)
    assert report.status == "exported"
    assert "notes.txt" not in {p.name for p in Path(report.output_dir).iterdir()}


def test_paths_with_spaces_and_unicode(demo_run_session, tmp_path):
    workdir = tmp_path / "my run ünïcödé 😀"
    shutil.copytree(demo_run_session.workdir, workdir)
    from molgen_export.mapping.run_config import write_checkpoint_config

    write_checkpoint_config(workdir / "run" / "checkpoint", workdir / "run" / "job_config.json", launch_dir=workdir)
    report = export_step(workdir / "run" / "checkpoint" / "step-10")
    assert report.fidelity["passed"] and "ünïcödé" in report.output_dir


# -- properties ---------------------------------------------------------------------------------------------

_segment = st.sampled_from(["layers", "0", "1", "12", "attention", "wq", "wk", "wv", "qkv_linear", "weight",
                            "feed_forward", "w1", "norm", "output", "lm_head", "tok_embeddings", "moe", "experts"])


@given(st.lists(_segment, min_size=1, max_size=6))
def test_canonical_key_is_idempotent(parts):
    key = ".".join(parts)
    once, _ = canonical_titan_key(key)
    assert canonical_titan_key(once)[0] == once


@given(st.lists(_segment, min_size=2, max_size=6), st.data())
def test_wrapper_segments_never_change_the_canonical_key(parts, data):
    key = ".".join(parts)
    position = data.draw(st.integers(0, len(parts)))
    wrapper = data.draw(st.sampled_from(WRAPPER_SEGMENTS))
    wrapped = ".".join(parts[:position] + [wrapper] + parts[position:])
    assert canonical_titan_key(wrapped)[0] == canonical_titan_key(key)[0]


_json = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
_config_like = st.fixed_dictionaries({}, optional={
    "model_spec": st.fixed_dictionaries({}, optional={"name": _json, "flavor": _json, "model": _json}),
    "model": st.fixed_dictionaries({}, optional={"name": _json, "flavor": _json, "hf_assets_path": _json}),
    "training": st.dictionaries(st.sampled_from(["seq_len", "dtype", "mixed_precision_param"]), _json),
    "checkpoint": st.dictionaries(st.sampled_from(["folder", "keep_latest_k"]), _json),
    "hf_assets_path": _json, "dump_folder": _json, "job": _json,
})


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(_config_like)
def test_any_config_dict_gives_a_run_config_or_a_config_error(data):
    """Whatever the dict holds: a RunConfig, or exactly a ConfigError naming the file (exit 2), nothing printed."""
    import contextlib
    import io

    from molgen_export.mapping.run_config import RunConfig

    source = Path("/nonexistent/run/job_config.json")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        try:
            result = parse_run_config(data, source)
        except MolgenExportError as exc:
            assert type(exc) is ConfigError, f"{type(exc).__name__}: {exc}"
            assert str(source) in str(exc) and exc.path == source
            assert exc.exit_code == 2
        else:
            assert isinstance(result, RunConfig) and result.source == source
    assert printed.getvalue() == ""
