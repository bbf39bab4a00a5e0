"""What happened to every step of a run, from our own files only, while the run goes on.

It reads each `step-N-hf/export_report.json`, the watcher's journal and failure records (`watch_state`), the
`smoke.jsonl` of the smoke hook and the eval results under `evals/step-N/` (`evals`), and the checkpoint folder's
`step-N/.metadata` times. Any of them may be missing or half-written: what cannot be read is named and left out.
`format_table` makes the table, `render_html` one self-contained page and `render_plots` the plots (matplotlib,
Agg); `molgen_export.cli.report` is the `molgen-export report` command over them.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from molgen_export.dcp import discover
from molgen_export import evals
from molgen_export.errors import UsageError
from molgen_export.watch.journal import JOURNAL_FILE, failure_record_path

logger = logging.getLogger(__name__)

_OUTPUT_RE = re.compile(r"^step-(\d+)-hf$")
_TEMP_RE = re.compile(r"^\.step-(\d+)-hf\.tmp-")
_FAILED_RE = re.compile(r"^\.step-(\d+)-hf\.failed\.json$")
SMOKE_FILE = "smoke.jsonl"


@dataclass
class StepRow:
    """One step of the report."""

    step: int
    status: str
    """`exported`, `exporting`, `failed` (will retry), `gave-up`, `purged` (checkpoint deleted before it could be
    exported), `aborted`, `skipped`, `pending` (complete, not exported yet), `saving` (no `.metadata` yet) or
    `removed` (the export folder is gone)."""
    reason: str | None = None
    output_dir: str | None = None
    export_s: float | None = None
    """The export's own duration."""
    latency_s: float | None = None
    """From the checkpoint's `.metadata` being written to the export being published."""
    output_bytes: int | None = None
    export_dtype: str | None = None
    max_abs_diff: float | None = None
    logits_tolerance: float | None = None
    top1_agreement: float | None = None
    tied: bool | None = None
    tie_detail: str | None = None
    warnings: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    hooks: list[dict] = field(default_factory=list)
    """The last run of each `--on-export` command for this step: command, exit code, error."""
    smoke: dict | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class RunReport:
    """Every step found, and what could not be read."""

    export_root: Path
    checkpoint_root: Path | None
    rows: list[StepRow]
    unreadable: list[str] = field(default_factory=list)
    made_at: float = field(default_factory=time.time)

    @property
    def metric_names(self) -> list[str]:
        return sorted({name for row in self.rows for name in row.metrics})

    def counts(self) -> Counter:
        return Counter(row.status for row in self.rows)

    def to_json(self) -> dict:
        return {"export_root": str(self.export_root),
                "checkpoint_root": str(self.checkpoint_root) if self.checkpoint_root else None,
                "made_at": self.made_at, "counts": dict(self.counts()), "metrics": self.metric_names,
                "rows": [asdict(row) for row in self.rows], "unreadable": self.unreadable}


# --- finding the files ----------------------------------------------------------------------------------------------


def _is_export_root(path: Path) -> bool:
    try:
        names = [child.name for child in path.iterdir()]
    except OSError:
        return False
    return any(n == JOURNAL_FILE or n == evals.EVALS_DIR or _OUTPUT_RE.match(n) or _FAILED_RE.match(n) for n in names)


def find_roots(path: Path) -> tuple[Path, Path | None]:
    """The export root and (when it can be told) the checkpoint root of a run folder, checkpoint folder or export
    root.

    Raises:
        UsageError: the path does not exist, or holds neither exports nor checkpoints.
    """
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path} does not exist or is not a folder",
                         hint="pass the export root (<checkpoint_root>-hf), the checkpoint folder or the run folder")
    if _is_export_root(path):
        return path, None
    checkpoint_root, _ = discover.resolve_checkpoint_root(path)
    sibling = checkpoint_root.parent / f"{checkpoint_root.name}-hf"
    if not sibling.is_dir() and _is_export_root(checkpoint_root):  # --layout beside
        return checkpoint_root, checkpoint_root
    return sibling, checkpoint_root


def _read_json(path: Path, unreadable: list[str]) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        unreadable.append(f"{path} (not valid JSON: being written?)")
        return None
    return data if isinstance(data, dict) else None


def _read_jsonl(path: Path, unreadable: list[str]) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        unreadable.append(f"{path} ({exc})")
        return []
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            if number < len(lines):  # the last line may be mid-append
                unreadable.append(f"{path} line {number} (not valid JSON)")
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _metadata_mtime(step_dir: str | Path | None) -> float | None:
    if not step_dir:
        return None
    try:
        return (Path(step_dir) / discover.METADATA_FILE).stat().st_mtime
    except OSError:
        return None


# --- one row per step -----------------------------------------------------------------------------------------------


def collect_report(path: Path) -> RunReport:
    """Read everything there is about each step of a run.

    Args:
        path: the export root, the checkpoint folder or the run folder.

    Raises:
        UsageError: nothing to report on at `path`.
    """
    export_root, checkpoint_root = find_roots(path)
    unreadable: list[str] = []
    journal = _read_jsonl(export_root / JOURNAL_FILE, unreadable)
    smoke = _read_jsonl(export_root / SMOKE_FILE, unreadable)
    names = [child.name for child in export_root.iterdir()] if export_root.is_dir() else []
    steps: set[int] = set()
    for name in names:
        for pattern in (_OUTPUT_RE, _TEMP_RE, _FAILED_RE):
            match = pattern.match(name)
            if match:
                steps.add(int(match.group(1)))
    eval_root = export_root / evals.EVALS_DIR
    if eval_root.is_dir():
        steps.update(n for n in (discover.step_number(d) for d in eval_root.iterdir()) if n is not None)
    steps.update(e["step"] for e in journal if isinstance(e.get("step"), int))
    reports = {}
    for step in steps:
        report = _read_json(export_root / f"step-{step}-hf" / "export_report.json", unreadable)
        if report is not None:
            reports[step] = report
    if checkpoint_root is None:  # told the export root: the checkpoint folder is where the exports came from
        sources = [r.get("step_dir") for r in reports.values()] + [e.get("step_dir") for e in journal]
        parents = Counter(Path(s).parent for s in sources if s)
        checkpoint_root = parents.most_common(1)[0][0] if parents else None
    checkpoints = {}
    if checkpoint_root is not None and checkpoint_root.is_dir():
        try:
            checkpoints = {info.step: info for info in discover.list_steps(checkpoint_root)}
        except OSError as exc:
            unreadable.append(f"{checkpoint_root} ({exc})")
    steps.update(checkpoints)
    rows = [_row(step, export_root, reports.get(step), checkpoints.get(step), journal, smoke, names, unreadable)
            for step in sorted(steps)]
    return RunReport(export_root, checkpoint_root, rows, unreadable)


def _row(step: int, export_root: Path, report: dict | None, checkpoint, journal: list[dict], smoke: list[dict],
         names: list[str], unreadable: list[str]) -> StepRow:
    output_dir = export_root / f"step-{step}-hf"
    events = [e for e in journal if e.get("step") == step and e.get("event") == "step"]
    last = events[-1] if events else None
    failure = _read_json(failure_record_path(output_dir), unreadable)
    row = StepRow(step, "pending")
    if report is not None and report.get("status") == "exported":
        row.status, row.output_dir = "exported", str(output_dir)
        _fill_from_report(row, report)
        exported = [e for e in events if e.get("status") == "exported"]
        if exported and exported[-1].get("start_latency_s") is not None:
            row.latency_s = exported[-1]["start_latency_s"] + (exported[-1].get("duration_s") or 0.0)
        else:
            written = _metadata_mtime(report.get("step_dir"))
            try:
                published = (output_dir / "export_report.json").stat().st_mtime
            except OSError:
                published = None
            if written is not None and published is not None and published >= written:
                row.latency_s = published - written
        if failure:
            row.notes.append(f"a later attempt failed: {failure.get('error')}")
    elif any(n.startswith(f".step-{step}-hf.tmp-") for n in names) or (last and last.get("status") == "locked"):
        row.status = "exporting"
    elif failure:
        row.status = "gave-up" if failure.get("gave_up") else "failed"
        row.reason = failure.get("error")
        if failure.get("attempts"):
            row.notes.append(f"{failure['attempts']} attempt(s)"
                             + (f", next in {failure['next_retry_in_s']:g} s" if failure.get("next_retry_in_s") else ""))
    elif last is not None and last.get("status") in ("vanished", "aborted", "skipped", "failed", "gave-up"):
        row.status = {"vanished": "purged"}.get(last["status"], last["status"])
        row.reason = last.get("error")
    elif checkpoint is not None:
        row.status = "pending" if checkpoint.complete else "saving"
    elif any(e.get("status") == "exported" for e in events):
        row.status, row.reason = "removed", f"{output_dir} is gone"
    else:
        row.status = "removed" if report is None else str(report.get("status"))
    if checkpoint is None and row.status == "exported":
        row.notes.append("checkpoint purged")
    row.metrics, bad = evals.read_eval_metrics(evals.eval_dir_for(export_root, step))
    unreadable.extend(f"{path} (not valid JSON: being written?)" for path in bad)
    hooks: dict[str, dict] = {}
    for entry in journal:
        if entry.get("step") == step and entry.get("event") == "on_export":
            hooks[entry.get("command", "")] = {"command": entry.get("command"), "exit_code": entry.get("exit_code"),
                                               "error": entry.get("error"), "duration_s": entry.get("duration_s")}
    row.hooks = list(hooks.values())
    mine = [e for e in smoke if e.get("step") == step]
    if mine:
        row.smoke = {k: mine[-1].get(k) for k in ("ok", "generated", "error", "load_s")}
    return row


def _fill_from_report(row: StepRow, report: dict) -> None:
    row.export_s = (report.get("timings") or {}).get("total")
    row.output_bytes = report.get("output_bytes")
    row.export_dtype = report.get("export_dtype")
    fidelity = report.get("fidelity") or {}
    row.max_abs_diff = fidelity.get("max_abs_diff")
    row.logits_tolerance = fidelity.get("tolerance")
    row.top1_agreement = fidelity.get("top1_agreement")
    row.tied = report.get("tied")
    row.tie_detail = next((f.get("detail") for f in report.get("findings") or [] if f.get("name") == "tied_weights"),
                          None)
    row.warnings = [str(w) for w in report.get("warnings") or []]


# --- the terminal table ---------------------------------------------------------------------------------------------

TABLE_METRICS = 6
"""Eval metrics shown as columns in the terminal; the rest are in `--json` and `--html`."""


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _hooks_cell(row: StepRow) -> str:
    if not row.hooks:
        return "-"
    failed = [h for h in row.hooks if h["exit_code"] != 0]
    return "ok" if not failed else f"{len(failed)} failed"


def table_cells(report: RunReport) -> tuple[list[str], list[list[str]]]:
    """The header and cells of the step table (the terminal's and the page's)."""
    metrics = report.metric_names
    header = ["step", "status", "export s", "latency s", "size", "max|Δ|", "top-1", "tie", "warnings", *metrics,
              "hooks"]
    cells = []
    for row in report.rows:
        tie = "-" if row.tied is None else ("tied" if row.tied else "untied")
        cells.append([str(row.step), row.status, _fmt(row.export_s, ".1f"), _fmt(row.latency_s, ".1f"),
                      _size(row.output_bytes), _fmt(row.max_abs_diff, ".2g"), _fmt(row.top1_agreement, ".3f"), tie,
                      str(len(row.warnings)) if row.status == "exported" else "-",
                      *(_fmt(row.metrics.get(m), ".4g") for m in metrics), _hooks_cell(row)])
    return header, cells


def format_table(report: RunReport) -> str:
    """The terminal summary: one line per step, then the reasons, warnings and failed hooks."""
    header, cells = table_cells(report)
    metrics = report.metric_names
    if len(metrics) > TABLE_METRICS:  # keep the table readable; the page has them all
        keep = list(range(9)) + list(range(9, 9 + TABLE_METRICS)) + [len(header) - 1]
        header = [header[i] for i in keep]
        cells = [[line[i] for i in keep] for line in cells]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = [f"export root: {report.export_root}"
             + (f"  (checkpoints: {report.checkpoint_root})" if report.checkpoint_root else "")]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    if not report.rows:
        lines.append("(no steps yet)")
    counts = report.counts()
    lines.append("total: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "nothing"))
    if len(metrics) > TABLE_METRICS:
        lines.append(f"{len(metrics) - TABLE_METRICS} more eval metric(s) in --json and --html")
    lines += _details(report)
    return "\n".join(lines)


def _details(report: RunReport) -> list[str]:
    lines = []
    for row in report.rows:
        name = f"step-{row.step}"
        if row.reason:
            lines.append(f"{name} {row.status}: {row.reason.splitlines()[0]}")
        lines += [f"{name} warning: {w}" for w in row.warnings]
        lines += [f"{name} note: {n}" for n in row.notes]
        for hook in row.hooks:
            if hook["exit_code"] != 0:
                lines.append(f"{name} on_export {hook['command']!r} exited {hook['exit_code']}"
                             + (f" ({hook['error']})" if hook.get("error") else ""))
        if row.smoke is not None and not row.smoke.get("ok"):
            lines.append(f"{name} smoke failed: {row.smoke.get('error')}")
    lines += [f"unreadable: {u}" for u in report.unreadable]
    return lines


# --- plots and the page ---------------------------------------------------------------------------------------------


PLOTTED_METRICS = 12
"""Eval metrics plotted (in name order); the table lists them all."""


def render_plots(report: RunReport) -> bytes:
    """One PNG: a panel per eval metric over steps, then fidelity and latency over steps; failed steps marked.

    Raises:
        UsageError: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise UsageError("the report's plots need matplotlib", hint=evals.INSTALL_HINT) from exc
    matplotlib.use("Agg", force=True)
    import io
    import math

    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    exported = [r for r in report.rows if r.status == "exported"]
    bad = [r.step for r in report.rows if r.status in ("failed", "gave-up", "purged", "aborted")]
    metrics = report.metric_names[:PLOTTED_METRICS]
    metric_rows = max(1, math.ceil(len(metrics) / 2))
    figure = Figure(figsize=(10, 2.3 * metric_rows + 3.2), dpi=100, layout="constrained")
    grid = figure.add_gridspec(metric_rows + 1, 2, height_ratios=[1.0] * metric_rows + [1.4])
    axes = []
    if not metrics:
        empty = figure.add_subplot(grid[0, :])
        empty.text(0.5, 0.5, 'no eval results yet (--on-export "@lm-eval --tasks ...")', ha="center", va="center",
                   transform=empty.transAxes, color="gray")
        empty.set_title("eval metrics")
        axes.append(empty)
    for i, name in enumerate(metrics):
        axis = figure.add_subplot(grid[i // 2, i % 2])
        points = [(r.step, r.metrics[name]) for r in report.rows if name in r.metrics]
        axis.plot(*zip(*points), marker="o", color=f"C{i % 10}")
        values = [v for _, v in points]
        if min(values) > 0 and max(values) / min(values) > 100:
            axis.set_yscale("log")
        axis.set_title(name, fontsize="medium")
        axes.append(axis)
    fidelity = figure.add_subplot(grid[metric_rows, 0])
    points = [(r.step, r.max_abs_diff) for r in exported if r.max_abs_diff is not None]
    if points:
        fidelity.plot(*zip(*points), marker="o", color="tab:blue", label="max|Δlogit|")
    limits = [(r.step, r.logits_tolerance) for r in exported if r.logits_tolerance is not None]
    if limits:
        fidelity.plot(*zip(*limits), linestyle="--", color="tab:gray", label="limit")
    fidelity.set_ylim(bottom=0)
    fidelity.set_ylabel("max|Δlogit|")
    twin = fidelity.twinx()
    points = [(r.step, r.top1_agreement) for r in exported if r.top1_agreement is not None]
    if points:
        twin.plot(*zip(*points), marker="s", linestyle=":", color="tab:green", label="top-1 agreement")
    twin.set_ylim(-0.02, 1.05)
    twin.set_ylabel("top-1 agreement", color="tab:green")
    fidelity.set_title("fidelity: TorchTitan vs exported HF logits", fontsize="medium")
    handles = fidelity.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    if handles:
        fidelity.legend(handles=handles, fontsize="small", loc="center right")
    timing = figure.add_subplot(grid[metric_rows, 1])
    for key, label, style in (("latency_s", "after .metadata (s)", "o-"), ("export_s", "export (s)", "s--")):
        points = [(r.step, getattr(r, key)) for r in exported if getattr(r, key) is not None]
        if points:
            timing.plot(*zip(*points), style, label=label)
    timing.set_ylim(bottom=0)
    timing.set_ylabel("seconds")
    timing.set_title("export latency", fontsize="medium")
    if timing.get_lines():
        timing.legend(fontsize="small", loc="best")
    axes += [fidelity, timing]
    steps = [r.step for r in report.rows]
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if steps:
            margin = max(1.0, (max(steps) - min(steps)) * 0.05)
            axis.set_xlim(min(steps) - margin, max(steps) + margin)
        for step in bad:
            axis.axvline(step, color="tab:red", linestyle=":", alpha=0.8)
    for axis in (fidelity, timing):
        axis.set_xlabel("step")
    title = f"molgen-export run report: {report.export_root}"
    if bad:
        title += f"  (red: {len(bad)} failed or purged step(s))"
    if len(report.metric_names) > len(metrics):
        title += f"  ({len(report.metric_names) - len(metrics)} more metrics in the table)"
    figure.suptitle(title, fontsize="medium")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;font-size:14px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}th{background:#eee;font-weight:600}
td:nth-child(2){text-align:left}.scroll{overflow-x:auto}
tr.exported td:nth-child(2){color:#1a7f37}tr.failed td:nth-child(2),tr.gave-up td:nth-child(2),
tr.purged td:nth-child(2){color:#cf222e;font-weight:bold}code{background:#f4f4f4}img{max-width:100%}
ul{font-size:14px}"""


def _header_html(name: str) -> str:
    """A column title; an eval metric `task/metric` on two lines, so many of them still fit."""
    from html import escape

    task, slash, metric = name.rpartition("/")
    return f"{escape(task)}/<br>{escape(metric)}" if slash else escape(name)


def render_html(report: RunReport, png: bytes) -> str:
    """One self-contained page: summary, the plots (PNG embedded as base64), the step table and the details."""
    import base64
    from html import escape

    header, cells = table_cells(report)
    counts = report.counts()
    made = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report.made_at))
    rows_html = []
    for row, line in zip(report.rows, cells):
        title = escape(row.reason or row.tie_detail or "", quote=True)
        rows_html.append(f'<tr id="step-{row.step}" class="{escape(row.status)}" title="{title}">'
                         + "".join(f"<td>{escape(c)}</td>" for c in line) + "</tr>")
    details = "".join(f"<li>{escape(line)}</li>" for line in _details(report))
    source = f" &middot; checkpoints <code>{escape(str(report.checkpoint_root))}</code>" if report.checkpoint_root else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>molgen-export report: {escape(report.export_root.name)}</title>
<style>{_CSS}</style></head><body>
<h1>molgen-export run report</h1>
<p>exports <code>{escape(str(report.export_root))}</code>{source} &middot; made {made} &middot;
{escape(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no steps yet")}</p>
<img alt="eval metrics, fidelity and latency over steps" src="data:image/png;base64,{base64.b64encode(png).decode()}">
<h2>Steps</h2>
<div class="scroll"><table><thead><tr>{"".join(f"<th>{_header_html(h)}</th>" for h in header)}</tr></thead>
<tbody>{"".join(rows_html)}</tbody></table></div>
<h2>Details</h2>
<ul>{details or "<li>no failures, warnings or notes</li>"}</ul>
</body></html>
"""
