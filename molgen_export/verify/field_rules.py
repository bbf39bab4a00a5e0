"""What the export does with one field of the run's model config: the rule type the reference's tables are made
of, and one field's decision (mapped to the HF config, irrelevant to the forward, or refused)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """What the export does with one model-config field (paths with `layers.*` for every layer)."""

    pattern: str
    action: str
    """`mapped` (carried to the HF config; the gate proves it), `irrelevant` (not part of the forward),
    `required` (must equal `value`, else the export is refused), `present` (refused when None)."""
    target: str = ""
    """For `mapped`: the HF config field; for the others: the reason."""
    value: Any = None

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.pattern.replace(".", r"\.").replace("*", r"[^.]+"), path) is not None


@dataclass(frozen=True)
class FieldDecision:
    """One leaf of the run's model config and what the export does with it."""

    path: str
    value: Any
    rule: Rule | None

    @property
    def refused(self) -> bool:
        if self.rule is None:
            return True
        if self.rule.action == "present":
            return self.value is None
        return self.rule.action == "required" and not same_value(self.value, self.rule.value)


def same_value(a, b) -> bool:
    """Equal, numbers compared as floats (a JSON `1` is the config's `1.0`)."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b
