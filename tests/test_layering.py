"""The pipeline's import rules: no stage imports a later one; the shells (CLI, watcher, runner) sit on top."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# stage -> modules it must never pull in (later stages and the shells around them)
LATER = {
    "molgen_export.discover": ["run_config", "dcp_read", "naming", "checks", "write", "fidelity", "export"],
    "molgen_export.run_config": ["dcp_read", "naming", "checks", "write", "fidelity", "export"],
    "molgen_export.dcp_read": ["naming", "checks", "write", "fidelity", "export"],
    "molgen_export.architecture": ["dcp_read", "naming", "checks", "write", "fidelity", "export"],
    "molgen_export.naming": ["checks", "write", "fidelity", "export"],
    "molgen_export.checks": ["write", "fidelity", "export"],
    "molgen_export.write": ["fidelity", "export"],
    "molgen_export.fidelity": ["export"],
    "molgen_export.reference": ["dcp_read", "naming", "checks", "write", "fidelity", "export"],
    "molgen_export.probe": ["dcp_read", "write", "export"],
    "molgen_export.preflight": ["dcp_read", "write", "fidelity", "export"],
    "molgen_export.export": ["watch", "runner", "cli"],
}
SHELLS = ["watch", "runner", "cli", "export_distributed"]


@pytest.mark.parametrize("module", sorted(LATER))
def test_stage_imports_no_later_stage(module):
    code = f"import sys, json, {module}; print(json.dumps(sorted(m for m in sys.modules if m.startswith('molgen_export'))))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                       timeout=120).stdout)
    forbidden = {f"molgen_export.{name}" for name in LATER[module] + SHELLS}
    assert not forbidden & set(loaded), f"{module} imports {sorted(forbidden & set(loaded))}"


def test_public_api_is_importable_and_light():
    code = ("import sys, molgen_export; heavy = 'torch' in sys.modules; "
            "from molgen_export import export_step, ExportOptions, ExportReport, ConfigError, run_preflight; "
            "import json; print(json.dumps([heavy, sorted(molgen_export.__all__)]))")
    heavy, names = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                             text=True, timeout=120).stdout)
    assert not heavy  # `import molgen_export` alone loads no torch
    assert {"export_step", "plan_step", "ExportOptions", "ExportReport", "MolgenExportError", "run_preflight"} <= set(names)
