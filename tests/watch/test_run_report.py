"""`molgen-export report`: the table, JSON, PNG and HTML page made from a real run's files (exports, the watcher's
journal and failure records, eval results), while parts of it are still being written; and the page in a browser."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from molgen_export import cli
from molgen_export.options import ExportOptions
from molgen_export.pipeline.export import export_step
from molgen_export.watch.run_report import collect_report
from molgen_export.watch.watcher import Watcher, WatchOptions

FAST = ExportOptions(skip_logits=True, threads=1)
QUIET = dict(nice=0, rescan=0, retry_backoff=0.1)
# a command template of the user's own: writes a score into {eval_dir} in lm-eval's results shape
SCORE_HOOK = ('{python} -c "import json, sys; json.dump(dict(results=dict(mine=dict([(\'score,none\', '
              'int(sys.argv[1]) / 100)]))), open(sys.argv[2] + \'/mine.json\', \'w\'))" {step} {eval_dir}')


def _lines(out: str) -> dict[str, str]:
    """The table's rows by step number."""
    return {line.split()[0]: line for line in out.splitlines() if re.match(r"^\d+ ", line)}


def test_table_of_a_cli_export(demo_run, capsys):
    for step_dir in demo_run.steps:
        export_step(step_dir)
    assert cli.main(["report", str(demo_run.run_dir)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("step "))
    assert header.split() == ["step", "status", "export", "s", "latency", "s", "size", "max|Δ|", "top-1", "tie",
                              "warnings", "hooks"]
    rows = _lines(out)
    assert set(rows) == {"10", "20"}
    for step in ("10", "20"):
        cells = rows[step].split()
        assert cells[1] == "exported" and cells[4:6] == ["0.28", "MB"]
        assert float(cells[6]) <= 1e-3 and cells[7] == "1.000" and cells[8] == "tied" and cells[9] == "0"
        assert float(cells[2]) > 0 and float(cells[3]) >= float(cells[2])  # latency from .metadata's mtime
    assert "total: 2 exported" in out
    assert f"export root: {demo_run.run_dir / 'checkpoint-hf'}" in out
    assert cli.main(["report", str(demo_run.workdir / "nowhere")]) == 2
    assert cli.main(["report", str(demo_run.assets_dir)]) == 2  # neither exports nor checkpoints
    assert "no step-N checkpoint folder found" in capsys.readouterr().err


def test_a_failed_step_shows_its_reason_and_a_command_templates_scores_are_columns(demo_run, capsys):
    shard = next((demo_run.checkpoint_root / "step-20").glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    watcher = Watcher(demo_run.checkpoint_root, FAST, WatchOptions(once=True, retries=0, on_export=SCORE_HOOK, **QUIET))
    assert [o.status for o in watcher.run()] == ["exported", "gave-up"]
    assert cli.main(["report", str(watcher.export_root)]) == 0
    out = capsys.readouterr().out
    rows = _lines(out)
    assert rows["10"].split()[1] == "exported" and rows["10"].split()[-2:] == ["0.1", "ok"]
    assert rows["20"].split()[1] == "gave-up"
    assert "mine/score" in next(line for line in out.splitlines() if line.startswith("step "))
    reason = next(line for line in out.splitlines() if line.startswith("step-20 gave-up: "))
    assert "truncated" in reason and str(shard.name) in reason
    assert "total: 1 exported, 1 gave-up" in out

    assert cli.main(["report", str(demo_run.run_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["counts"] == {"exported": 1, "gave-up": 1} and data["metrics"] == ["mine/score"]
    by_step = {row["step"]: row for row in data["rows"]}
    assert by_step[10]["metrics"] == {"mine/score": 0.1} and by_step[10]["tied"] is True
    assert by_step[10]["hooks"][0]["exit_code"] == 0 and by_step[10]["latency_s"] is not None
    assert "CheckpointFormatError" in by_step[20]["reason"] or "truncated" in by_step[20]["reason"]


def test_report_while_the_run_goes_on(demo_run):
    """Purged, in-flight and half-written files: each shows as what it is and nothing stops the report."""
    watcher = Watcher(demo_run.checkpoint_root, FAST, WatchOptions(once=True, on_export=SCORE_HOOK, **QUIET))
    watcher.run()
    export_root = watcher.export_root
    # gone before it was read (journaled vanished)
    Watcher(demo_run.checkpoint_root, FAST, WatchOptions(**QUIET)).export_now(demo_run.checkpoint_root / "step-30")
    (demo_run.checkpoint_root / "step-40").mkdir()  # DCP still writing: no .metadata yet
    shutil.copytree(demo_run.steps[0], demo_run.checkpoint_root / "step-50")  # complete, not exported yet
    (export_root / ".step-60-hf.tmp-999-abc").mkdir()  # an export in flight
    with open(export_root / ".molgen-watch.jsonl", "a") as f:
        f.write('{"event": "step", "step": 70, "sta')  # a journal line being appended
    (export_root / "evals" / "step-20" / "lm_eval_late.json").write_text('{"results": {"t"')  # eval being written
    shutil.rmtree(demo_run.steps[0])  # keep_latest_k purged the checkpoint; its export stays
    report = collect_report(demo_run.run_dir)
    status = {row.step: row.status for row in report.rows}
    assert status == {10: "exported", 20: "exported", 30: "purged", 40: "saving", 50: "pending", 60: "exporting"}
    rows = {row.step: row for row in report.rows}
    assert "checkpoint purged" in rows[10].notes and rows[20].metrics == {"mine/score": 0.2}
    assert "deleted" in rows[30].reason or "vanished" in rows[30].reason or "gone" in rows[30].reason
    assert report.unreadable == [f"{export_root / 'evals' / 'step-20' / 'lm_eval_late.json'} "
                                 "(not valid JSON: being written?)"]


def test_html_page_and_png(demo_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    Watcher(demo_run.checkpoint_root, FAST, WatchOptions(once=True, on_export=SCORE_HOOK, **QUIET)).run()
    page, png = tmp_path / "out" / "report.html", tmp_path / "out" / "report.png"
    assert cli.main(["report", str(demo_run.run_dir), "--html", str(page), "--png", str(png)]) == 0
    assert f"wrote {page}" in capsys.readouterr().out
    html = page.read_text()
    for step in (10, 20):
        row = re.search(rf'<tr id="step-{step}" class="exported"[^>]*>(.*?)</tr>', html)
        assert row and "<td>exported</td>" in row.group(1) and "<td>tied</td>" in row.group(1)
    assert "<th>mine/<br>score</th>" in html and "<td>0.2</td>" in html
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 1
    embedded = base64.b64decode(images[0])
    assert embedded == png.read_bytes()  # the page needs no other file
    picture = Image.open(io.BytesIO(embedded))
    assert picture.format == "PNG" and picture.size[0] >= 800 and picture.size[1] >= 500
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing loaded from anywhere


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.slow
def test_page_renders_in_a_headless_browser(demo_run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium binary found (chromium, chromium-browser, google-chrome); CI installs it with apt")
    pytest.importorskip("matplotlib")
    import numpy as np
    from PIL import Image

    Watcher(demo_run.checkpoint_root, FAST, WatchOptions(once=True, on_export=SCORE_HOOK, **QUIET)).run()
    page, shot = tmp_path / "report.html", tmp_path / "shot.png"
    assert cli.main(["report", str(demo_run.run_dir), "--html", str(page)]) == 0
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1100,1500", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1500, 1100)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    not_white = (pixels < 245).any(axis=2).mean()
    assert len(colours) > 50 and not_white > 0.05, f"blank page? {len(colours)} colours, {not_white:.1%} not white"
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    for step in (10, 20):
        assert re.search(rf'<tr id="step-{step}" class="exported"', dom)
    image = re.search(r'<img [^>]*src="data:image/png', dom)
    assert image is not None
    print(f"screenshot: {len(colours)} colours, {not_white:.1%} of pixels not white", file=sys.stderr)
