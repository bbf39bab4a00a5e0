"""Evaluation on export: the `--on-export` recipes (`@smoke`, `@lm-eval`, or a command template of your own) and the
results they leave in `<export_root>/evals/step-N/`.

A recipe is an `--on-export` template that starts with `@name`; the watcher expands it (`expand_recipe`) and runs it
like any other command: in a subprocess, with a timeout, its exit status journaled, its failure never stopping the
watcher. `@lm-eval ARGS` runs `lm_eval run --model hf --model_args pretrained=<step-N-hf>,dtype=float32 --device cpu
--output_path <export_root>/evals/step-N/lm_eval.json ARGS` (vLLM on a GPU where it is installed); `@smoke` is
`molgen_export.integrations.on_export_smoke`. Every eval result file is lm-eval's shape, `{"results": {task: {metric: value}}}`, which is
also what a command of your own writes into `{eval_dir}` to appear in `molgen-export report`.

This module imports neither torch nor lm_eval at import time: the watcher expands recipes without loading them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from molgen_export.errors import UsageError

logger = logging.getLogger(__name__)

EVALS_DIR = "evals"
"""Folder of the export root that holds `step-N/` eval results."""

RECIPES: dict[str, str] = {
    # @name: the command it stands for; the user's words after @name are appended.
    "smoke": "{python} -m molgen_export.integrations.on_export_smoke {hf_dir} {step}",
    "lm-eval": "{python} -m molgen_export.cli.eval lm-eval {hf_dir} --eval-dir {eval_dir}",
}

INSTALL_HINT = "pip install 'molgen-export[eval]' (lm-eval[hf] and matplotlib) into the environment that runs the watcher"


def eval_dir_for(export_root: Path, step: int) -> Path:
    """`<export_root>/evals/step-N/`: where the evals of one step write their results."""
    return Path(export_root) / EVALS_DIR / f"step-{step}"


def expand_recipe(template: str) -> str:
    """The command an `--on-export` template stands for: `@name ARGS` becomes the recipe's command plus ARGS.

    Args:
        template: an `--on-export` template; one not starting with `@` is returned unchanged.

    Raises:
        UsageError: `@name` names no recipe.
    """
    stripped = template.strip()
    if not stripped.startswith("@"):
        return template
    name, _, rest = stripped[1:].partition(" ")
    if name not in RECIPES:
        raise UsageError(f"--on-export names the recipe @{name}, which does not exist",
                         hint="use " + ", ".join(f"@{n}" for n in RECIPES) + ", or a command such as "
                              "\"python my_eval.py {hf_dir} {eval_dir}\"")
    return f"{RECIPES[name]} {rest.strip()}".strip()


# --- lm-eval --------------------------------------------------------------------------------------------------------


def choose_backend(model: str = "auto", device: str = "auto") -> tuple[str, str]:
    """lm-eval's `--model` and `--device` for this machine: vLLM on a GPU where it is importable, else `hf`.

    Args:
        model: `auto`, or an lm-eval model name (`hf`, `vllm`, ...) used as given.
        device: `auto` (cuda when torch sees a GPU, else cpu) or a device used as given.
    """
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if model == "auto":
        model = "vllm" if device.startswith("cuda") and importlib.util.find_spec("vllm") is not None else "hf"
    return model, device


def lm_eval_argv(hf_dir: Path, eval_dir: Path, lm_eval_args: Sequence[str], *, model: str = "hf",
                 device: str = "cpu", model_args: str = "") -> list[str]:
    """The `lm_eval run` command line that evaluates one export into `eval_dir/lm_eval_<time>.json`.

    Args:
        hf_dir: the exported `step-N-hf` folder.
        eval_dir: `<export_root>/evals/step-N/`.
        lm_eval_args: the user's lm-eval flags (`--tasks ...`, `--limit`, `--include_path`, ...), passed on as given.
        model: lm-eval's model backend (`hf`, `vllm`).
        device: `cpu` or `cuda[:i]`; the HF backend runs float32 on CPU, the export's own dtype on a GPU.
        model_args: extra `key=value,...` model arguments, after ours (they win).
    """
    dtype = "float32" if device == "cpu" else "auto"
    args = [f"pretrained={hf_dir}", f"dtype={dtype}"] + [a for a in model_args.split(",") if a]
    argv = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", ",".join(args)]
    if model != "vllm":  # vLLM places the model itself and has no --device
        argv += ["--device", device]
    if not any(a == "--output_path" or a.startswith("--output_path=") or a == "-o" for a in lm_eval_args):
        argv += ["--output_path", str(eval_dir / "lm_eval.json")]
    return argv + list(lm_eval_args)


def write_multiple_choice_task(tasks_dir: Path, name: str, rows: Iterable[tuple[str, Sequence[str], int]],
                               metrics: Sequence[str] = ("acc", "acc_norm")) -> Path:
    """Write a local lm-eval `multiple_choice` task (a JSONL file and its YAML) that downloads nothing.

    Use it with `--include_path tasks_dir --tasks name`. Each choice is scored by its log-likelihood right after the
    query (appended as is: put a leading space in the choices where one belongs).

    Args:
        tasks_dir: folder to write `<name>.jsonl` and `<name>.yaml` into.
        name: the task name.
        rows: (query, choices, index of the right choice).
        metrics: `acc` (highest log-likelihood), `acc_norm` (per byte, for choices of unequal length).

    Returns:
        The YAML file.
    """
    docs = []
    for query, choices, gold in rows:
        if not 0 <= gold < len(choices):
            raise ValueError(f"{name}: answer index {gold} outside the {len(choices)} choices of {query!r}")
        docs.append({"query": query, "choices": list(choices), "gold": gold})
    return _write_task(tasks_dir, name, docs, [
        "output_type: multiple_choice",
        'doc_to_text: "{{query}}"',
        'doc_to_choice: "{{choices}}"',
        'doc_to_target: "{{gold}}"',
        'target_delimiter: ""',
    ], list(metrics), higher_is_better=True)


def write_perplexity_task(tasks_dir: Path, name: str, texts: Iterable[str],
                          metrics: Sequence[str] = ("bits_per_byte", "byte_perplexity", "word_perplexity")) -> Path:
    """Write a local lm-eval `loglikelihood_rolling` task over whole texts, scored as lm-eval's wikitext task is
    (`bits_per_byte`, `byte_perplexity`, `word_perplexity`: lower is better).

    Returns:
        The YAML file.
    """
    return _write_task(tasks_dir, name, [{"text": text} for text in texts], [
        "output_type: loglikelihood_rolling",
        'doc_to_text: ""',
        'doc_to_target: "{{text}}"',
    ], list(metrics), higher_is_better=False)


def _write_task(tasks_dir: Path, name: str, docs: list[dict], body: list[str], metrics: list[str], *,
                higher_is_better: bool) -> Path:
    tasks_dir = Path(tasks_dir)
    tasks_dir.mkdir(parents=True, exist_ok=True)
    data = tasks_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs), encoding="utf-8")
    aggregation = "mean" if higher_is_better else None
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
             f"    test: {json.dumps(str(data.absolute()))}", "test_split: test", *body, "metric_list:"]
    for metric in metrics:
        lines += [f"  - metric: {metric}"]
        # lm-eval's own aggregations for the perplexities (weighted_perplexity, bits_per_byte) are the defaults
        lines += [f"    aggregation: {aggregation}"] if aggregation else []
        lines += [f"    higher_is_better: {str(higher_is_better).lower()}"]
    lines += ["metadata:", "  version: 1.0", ""]
    yaml_path = tasks_dir / f"{name}.yaml"
    yaml_path.write_text("\n".join(lines), encoding="utf-8")
    return yaml_path


DEMO_TASKS = ("molgen_demo_smiles", "molgen_demo_bpb")
"""The demo's local tasks: a SMILES continuation against the same with two characters swapped; bits per byte."""


def write_demo_tasks(tasks_dir: Path, rows: int = 20, seed: int = 7) -> list[str]:
    """Write the demo's two local lm-eval tasks from held-out lines of the demo corpus; returns their names.

    `molgen_demo_smiles` gives the first half of a SMILES string and two continuations, its own next 10 characters
    and the same with two neighbours swapped (`acc` rises as the model learns the grammar: 0.8 at steps 10 and 20
    of the demo, 1.0 from step 40); `molgen_demo_bpb` scores whole lines (`bits_per_byte` falls as the loss does).
    """
    import random

    from molgen_export.demo import synthetic_corpus

    corpus = synthetic_corpus(lines=rows * 3, seed=seed)  # the demo trains on another seed's corpus
    rng = random.Random(seed)
    items = []
    for smiles in (s for s in corpus[0::2] if len(s) >= 12 and len(set(s)) > 2):
        cut = len(smiles) // 2
        own = smiles[cut:cut + 10]
        chars = list(own)
        while "".join(chars) == own:
            i = rng.randrange(len(own) - 1)
            chars = list(own)
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        gold = len(items) % 2
        swapped = "".join(chars)
        items.append((smiles[:cut], [own, swapped] if gold == 0 else [swapped, own], gold))
    write_multiple_choice_task(tasks_dir, DEMO_TASKS[0], items[:rows], metrics=("acc",))  # choices of equal length
    write_perplexity_task(tasks_dir, DEMO_TASKS[1], corpus[:10], metrics=("bits_per_byte", "word_perplexity"))
    return list(DEMO_TASKS)


# --- reading results ------------------------------------------------------------------------------------------------


_NOT_METRICS = frozenset({"alias", "name", "sample_len", "sample_count", "samples", "n-samples", "n_samples"})
"""Numbers in lm-eval's per-task results that count samples rather than score them."""


def read_eval_metrics(eval_dir: Path) -> tuple[dict[str, float], list[str]]:
    """Every numeric metric in the result files under one step's eval folder, as `task/metric` -> value.

    Reads lm-eval's shape (`{"results": {task: {"acc,none": 0.5, "acc_stderr,none": ...}}}`) from any `*.json`
    below `eval_dir`; stderr entries are left out, a filter other than `none` is kept as `metric[filter]`. Where two
    files give one metric, the newer file wins. A file being written (not valid JSON yet) is skipped and named.

    Returns:
        The metrics, and the files that could not be read.
    """
    metrics: dict[str, tuple[float, float]] = {}
    unreadable = []
    try:
        files = sorted(Path(eval_dir).rglob("*.json"))
    except OSError:
        return {}, []
    for path in files:
        try:
            mtime = path.stat().st_mtime
            results = json.loads(path.read_text()).get("results")
        except (OSError, ValueError, AttributeError):
            unreadable.append(str(path))
            continue
        if not isinstance(results, dict):
            continue
        for task, values in results.items():
            if not isinstance(values, dict):
                continue
            for key, value in values.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                metric, _, filter_name = str(key).partition(",")
                if "_stderr" in metric or metric in _NOT_METRICS:
                    continue
                name = f"{task}/{metric}" + (f"[{filter_name}]" if filter_name not in ("", "none") else "")
                if name not in metrics or metrics[name][0] <= mtime:
                    metrics[name] = (mtime, float(value))
    return {name: value for name, (_, value) in sorted(metrics.items())}, unreadable
