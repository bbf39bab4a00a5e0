"""Evaluation on export: the `@lm-eval` recipe run for real by the watcher on the demo run's exports (a local task,
nothing downloaded), the recipes' expansion and command lines, reading results, and hooks killed whole."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from molgen_export import evals
from molgen_export.options import ExportOptions
from molgen_export.errors import UsageError
from molgen_export.watch.watcher import Watcher, WatchOptions
from molgen_export.watch.on_export import ExportHooks
from molgen_export.watch.journal import read_journal

FAST = ExportOptions(skip_logits=True, threads=1)
QUIET = dict(nice=0, rescan=0, retry_backoff=0.1)
TASK = "molgen_test_mc"
ROWS = [  # (query, choices, right one): SMILES and sentences like the demo corpus, and their shuffled forms
    ("CC(=O)", ["OC", ")CO"], 0),
    ("the quick brown", [" fox jumps", "xo fspmuj"], 0),
    ("c1ccc", ["cc1", "1cc"], 0),
    ("carbon oxygen", [" gyxeno", " ring bond"], 1),
    ("N(C)C", ["(=O)O", "O)(=O"], 0),
    ("over the lazy", [" god", " dog"], 1),
]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """lm-eval and datasets must not reach any hub; their caches stay in the test's folder."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


@pytest.mark.slow
def test_watcher_runs_lm_eval_on_every_export_and_the_report_shows_it(demo_run, offline, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    task_yaml = evals.write_multiple_choice_task(tasks, TASK, ROWS)
    assert len((tasks / f"{TASK}.jsonl").read_text().splitlines()) == len(ROWS) and task_yaml.is_file()
    on_export = f"@lm-eval --tasks {TASK} --include_path {tasks} --device cpu"
    started = time.monotonic()
    watcher = Watcher(demo_run.checkpoint_root, FAST, WatchOptions(once=True, on_export=on_export, **QUIET))
    assert [(o.step, o.status) for o in watcher.run()] == [(10, "exported"), (20, "exported")]
    elapsed = time.monotonic() - started
    hooks = [e for e in read_journal(watcher.export_root) if e["event"] == "on_export"]
    assert [(e["step"], e["exit_code"]) for e in hooks] == [(10, 0), (20, 0)], hooks[-1]["output_tail"]
    assert hooks[0]["command"] == on_export
    assert hooks[0]["argv"][1:4] == ["-m", "molgen_export.cli.eval", "lm-eval"]
    assert f"|{TASK}|" in hooks[0]["output_tail"]  # the tail is lm-eval's own results table
    for step in (10, 20):
        eval_dir = watcher.export_root / "evals" / f"step-{step}"
        results = sorted(eval_dir.glob("lm_eval_*.json"))
        assert len(results) == 1, sorted(eval_dir.iterdir())
        data = json.loads(results[0].read_text())
        assert 0.0 <= data["results"][TASK]["acc,none"] <= 1.0
        assert data["n-samples"][TASK]["effective"] == len(ROWS)
        assert data["config"]["model_args"]["pretrained"] == str(watcher.export_root / f"step-{step}-hf")
        assert data["config"]["model_args"]["dtype"] == "float32"
        metrics, unreadable = evals.read_eval_metrics(eval_dir)
        assert set(metrics) == {f"{TASK}/acc", f"{TASK}/acc_norm"} and not unreadable
        assert metrics[f"{TASK}/acc"] == data["results"][TASK]["acc,none"]

    from molgen_export import cli

    assert cli.main(["report", str(watcher.export_root)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("step "))
    assert f"{TASK}/acc" in header and header.split()[-1] == "hooks"
    for step in (10, 20):
        line = next(line for line in out.splitlines() if line.startswith(f"{step} "))
        assert line.split()[1] == "exported" and line.split()[-1] == "ok"
    print(f"lm-eval on 2 exports through the watcher: {elapsed:.1f} s", file=sys.stderr)


def test_a_failing_recipe_is_journaled_and_the_watcher_goes_on(demo_run):
    watcher = Watcher(demo_run.checkpoint_root, FAST,
                      WatchOptions(once=True, on_export="@lm-eval --limit 3", **QUIET))  # no --tasks: refused
    assert [o.status for o in watcher.run()] == ["exported", "exported"]
    hooks = [e for e in read_journal(watcher.export_root) if e["event"] == "on_export"]
    assert [(e["step"], e["exit_code"]) for e in hooks] == [(10, 2), (20, 2)]
    assert "name the lm-eval tasks: --tasks" in hooks[0]["output_tail"]


def test_an_unknown_recipe_is_refused_when_the_watcher_is_made(demo_run):
    with pytest.raises(UsageError, match="@lm-evaluate") as caught:
        Watcher(demo_run.checkpoint_root, FAST, WatchOptions(once=True, on_export="@lm-evaluate --tasks x"))
    assert "@smoke" in caught.value.hint and "@lm-eval" in caught.value.hint


def test_recipes_expand_to_commands_and_templates_pass_unchanged():
    assert evals.expand_recipe("@smoke") == "{python} -m molgen_export.integrations.on_export_smoke {hf_dir} {step}"
    assert evals.expand_recipe("  @lm-eval --tasks a,b --limit 5") == (
        "{python} -m molgen_export.cli.eval lm-eval {hf_dir} --eval-dir {eval_dir} --tasks a,b --limit 5")
    template = "python my_eval.py {hf_dir} {eval_dir}/mine.json"
    assert evals.expand_recipe(template) == template


def test_lm_eval_command_lines(tmp_path):
    hf_dir, eval_dir = tmp_path / "step-7-hf", tmp_path / "evals" / "step-7"
    argv = evals.lm_eval_argv(hf_dir, eval_dir, ["--tasks", "hellaswag", "--limit", "10"])
    assert argv[:4] == [sys.executable, "-m", "lm_eval", "run"]
    assert argv[4:] == ["--model", "hf", "--model_args", f"pretrained={hf_dir},dtype=float32", "--device", "cpu",
                        "--output_path", str(eval_dir / "lm_eval.json"), "--tasks", "hellaswag", "--limit", "10"]
    vllm = evals.lm_eval_argv(hf_dir, eval_dir, ["--tasks", "x", "--output_path", "elsewhere.json"], model="vllm",
                              device="cuda", model_args="gpu_memory_utilization=0.3")
    assert "--device" not in vllm and vllm.count("--output_path") == 1
    assert vllm[vllm.index("--model_args") + 1] == f"pretrained={hf_dir},dtype=auto,gpu_memory_utilization=0.3"
    model, device = evals.choose_backend()
    import torch

    assert device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert model == ("vllm" if device == "cuda" and evals.importlib.util.find_spec("vllm") else "hf")
    assert evals.choose_backend("hf", "cpu") == ("hf", "cpu")


def test_eval_results_are_read_newest_first_and_half_written_files_are_named(tmp_path):
    eval_dir = tmp_path / "evals" / "step-5"
    (eval_dir / "nested").mkdir(parents=True)
    old = eval_dir / "lm_eval_2026-01-01.json"
    old.write_text(json.dumps({"results": {"t": {"alias": "t", "acc,none": 0.25, "acc_stderr,none": 0.1,
                                                 "sample_len": 8, "exact_match,flexible-extract": 0.5}}}))
    os.utime(old, (time.time() - 60, time.time() - 60))
    (eval_dir / "lm_eval_2026-01-02.json").write_text(json.dumps({"results": {"t": {"acc,none": 0.75}}}))
    (eval_dir / "nested" / "mine.json").write_text(json.dumps({"results": {"mine": {"score": 3, "ok": True}}}))
    (eval_dir / "being_written.json").write_text('{"results": {"t": {"acc,none"')
    metrics, unreadable = evals.read_eval_metrics(eval_dir)
    assert metrics == {"t/acc": 0.75, "t/exact_match[flexible-extract]": 0.5, "mine/score": 3.0}
    assert unreadable == [str(eval_dir / "being_written.json")]
    assert evals.read_eval_metrics(tmp_path / "none") == ({}, [])


def test_a_command_template_gets_eval_dir_and_export_root_and_is_killed_whole_on_timeout(tmp_path):
    export_root = tmp_path / "checkpoint-hf"
    child_pid = tmp_path / "child.pid"
    # the command starts a child of its own, then outlives the timeout: both must be killed
    code = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(120)']); open(sys.argv[1], 'w').write(str(child.pid)); "
            "open(sys.argv[2] + '/mine.json', 'w').write(sys.argv[3]); time.sleep(120)")
    hooks = ExportHooks(f'{{python}} -c "{code}" {child_pid} {{eval_dir}} {{export_root}}', export_root, 3.0,
                        lambda: False)
    started = time.monotonic()
    hooks.run(5, tmp_path / "checkpoint" / "step-5", export_root / "step-5-hf")
    assert time.monotonic() - started < 60
    entry = read_journal(export_root)[-1]
    assert entry["error"] == "killed after 3 s" and entry["exit_code"] == -9
    assert (export_root / "evals" / "step-5" / "mine.json").read_text() == str(export_root)
    pid = int(child_pid.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid), "the command's own child outlived the timeout"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_demo_tasks_are_local_multiple_choice_and_perplexity_tasks(tmp_path):
    names = evals.write_demo_tasks(tmp_path)
    assert names == list(evals.DEMO_TASKS)
    rows = [json.loads(line) for line in (tmp_path / "molgen_demo_smiles.jsonl").read_text().splitlines()]
    assert len(rows) == 20
    for row in rows:
        right, wrong = row["choices"][row["gold"]], row["choices"][1 - row["gold"]]
        assert right != wrong and sorted(right) == sorted(wrong)  # two neighbours swapped
    mc = (tmp_path / "molgen_demo_smiles.yaml").read_text()
    assert "output_type: multiple_choice" in mc and 'target_delimiter: ""' in mc and "dataset_path: json" in mc
    assert "output_type: loglikelihood_rolling" in (tmp_path / "molgen_demo_bpb.yaml").read_text()
    with pytest.raises(ValueError, match="answer index 2"):
        evals.write_multiple_choice_task(tmp_path, "bad", [("q", ["a", "b"], 2)])
