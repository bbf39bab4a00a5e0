"""The installed torchtitan, for tests: its model's own checkpoint names and a skip for what only 0.3 has."""

from __future__ import annotations

import pytest

from molgen_export.mapping import titan

TITAN = titan.installed()
IS_TITAN021 = TITAN.release < (0, 3, 0)


def native_key(titan_key: str) -> str:
    """The name the demo's checkpoints (saved by the installed torchtitan) give a canonical 0.3 key."""
    return TITAN.native_key(titan_key)


def requires_titan03(why: str):
    """Skip under torchtitan 0.2.1, saying which 0.3-only feature the test needs."""
    return pytest.mark.skipif(IS_TITAN021, reason=f"needs torchtitan 0.3 ({why}); torchtitan {TITAN.version} "
                                                  "is installed")


MOE_LAYERS = (0, 1) if IS_TITAN021 else (1,)
"""The demo MoE's MoE layers: layer 0 dense under 0.3; under 0.2.1, whose Qwen3ModelArgs makes every layer MoE or
none, both."""
