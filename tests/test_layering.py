"""The package's import rules: each stage imports only earlier ones, the shells sit on top, no import circle.

Read from the source (every `import`, also those inside functions), so a lazy import cannot hide an edge.
The ranks are the README's "Layout" section; a module of a higher rank may import one of a lower or equal rank.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "molgen_export"

RANKS = [
    ("molgen_export.errors", 0), ("molgen_export.cancel", 0), ("molgen_export.options", 1),
    ("molgen_export.dcp", 2),                 # discover, restricted unpickler, metadata, torch.save records, reading
    ("molgen_export.mapping", 3),             # run config, architecture, TorchTitan <-> HF key map
    ("molgen_export.hf", 4),                  # HF config files, safetensors writer, publish and locks
    ("molgen_export.verify", 5),              # checks, reference, logit gates, probe, preflight
    ("molgen_export.pipeline", 6),            # the export: plan, stream, verify, publish; distributed; report
    ("molgen_export.convert", 7),             # the other conversions (HF <-> TorchTitan, vLLM, JAX, nanoGPT)
    ("molgen_export.demo", 7), ("molgen_export.evals", 7),
    ("molgen_export.watch", 8),               # watcher, events, queue, journal, on-export hooks, run report
    ("molgen_export.cli.flags", 9),           # what the shells share: flags made from the options, logging, exit codes
    ("molgen_export.runner", 10),             # the training launcher with export.enabled
    ("molgen_export.integrations", 11),       # training-side entry points (hooks/ are scripts over these)
    ("molgen_export.cli", 12),                # the command line: nothing imports it but __main__
    ("molgen_export.__main__", 13),
]


def _rank(module: str) -> int:
    for prefix, rank in RANKS:
        if module == prefix or module.startswith(prefix + "."):
            return rank
    raise AssertionError(f"{module} has no rank: add its folder to RANKS and to the README's Layout section")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `path` imports anywhere in its body."""
    edges = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            edges |= {a.name for a in node.names if a.name.startswith("molgen_export")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("molgen_export"):
                continue
            for alias in node.names:
                edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {e for e in edges if e != name and e != "molgen_export"}


MODULES = _modules()
GRAPH = {name: _imports(path, name, MODULES) for name, path in MODULES.items() if name != "molgen_export"}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_module_imports_no_later_stage(module):
    later = sorted(e for e in GRAPH[module] if _rank(e) > _rank(module))
    assert not later, f"{module} (rank {_rank(module)}) imports {later}: a stage never imports a later one or a shell"


def test_no_import_circle():
    """Depth-first search over every module's imports: a back edge is a circle, reported with its path."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(GRAPH.get(name, ())):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_only_the_shells_read_the_command_line():
    """argparse lives in the shells (cli and its flags, runner, integrations); the stages take options objects."""
    readers = sorted(name for name, path in MODULES.items()
                     if "argparse" in path.read_text() and _rank(name) < _rank("molgen_export.cli.flags"))
    assert not readers, f"stages importing argparse: {readers}"


def test_the_shells_below_the_cli_import_only_its_flags():
    """The runner and the integrations share the CLI's flags, logging and exit codes, never its commands."""
    wrong = sorted((name, e) for name in GRAPH if _rank(name) < _rank("molgen_export.cli")
                   for e in GRAPH[name] if _rank(e) == _rank("molgen_export.cli"))
    assert not wrong, f"imports of the command line below it (only molgen_export.cli.flags is shared): {wrong}"


def _looks_up_a_command(path: Path) -> bool:
    """`getattr(module, f"run_{name}")` and the like: a function found by a name built at run time."""
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                and len(node.args) > 1 and isinstance(node.args[1], ast.JoinedStr)):
            text = "".join(v.value for v in node.args[1].values if isinstance(v, ast.Constant))
            if "run_" in text or "add_" in text or "_arguments" in text:
                return True
    return False


def test_no_command_is_looked_up_by_name():
    """The CLI's table names each command's functions, so grep finds their callers; no getattr by a built name."""
    found = sorted(name for name, path in MODULES.items() if _looks_up_a_command(path))
    assert not found, f"getattr with a built command name in {found}: import the function and name it in the table"


def test_public_api_is_importable_and_light():
    code = ("import sys, molgen_export; heavy = 'torch' in sys.modules; "
            "from molgen_export import export_step, ExportOptions, ExportReport, ConfigError, run_preflight; "
            "import json; print(json.dumps([heavy, sorted(molgen_export.__all__)]))")
    heavy, names = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                             text=True, timeout=120).stdout)
    assert not heavy  # `import molgen_export` alone loads no torch
    assert {"export_step", "plan_step", "ExportOptions", "ExportReport", "MolgenExportError", "run_preflight"} <= set(names)
