"""An example `--on-export` hook: load the exported folder with transformers and greedily generate a few tokens.

    molgen-export watch outputs/checkpoint --on-export "python -m molgen_export.integrations.on_export_smoke {hf_dir} {step}"

Prints one JSON line (step, load time, the generated text) and appends it to `<export_root>/smoke.jsonl`;
exits 1 when the folder does not load or generate, which the watcher records without stopping.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def smoke_test(hf_dir: Path, prompt: str = "CC(=O)O", max_new_tokens: int = 8) -> dict:
    """Load `hf_dir` (no remote code) and generate greedily from `prompt`; returns what happened."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype="auto")
    loaded = time.perf_counter() - started
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return {"hf_dir": str(hf_dir), "load_s": round(loaded, 3), "prompt": prompt,
            "generated": tokenizer.decode(new_tokens, skip_special_tokens=False), "generated_ids": new_tokens.tolist(),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


def main(argv: list[str] | None = None) -> int:
    """`python -m molgen_export.integrations.on_export_smoke HF_DIR STEP`: 0 when the export loads and generates, else 1."""
    parser = argparse.ArgumentParser(prog="python -m molgen_export.integrations.on_export_smoke", description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("step", type=int)
    parser.add_argument("--prompt", default="CC(=O)O")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--log", type=Path, help="JSON-lines file to append to (default <export_root>/smoke.jsonl)")
    args = parser.parse_args(argv)
    entry = {"step": args.step, "time": time.time()}
    try:
        entry.update(smoke_test(args.hf_dir, args.prompt, args.max_new_tokens), ok=True)
    except Exception as exc:  # noqa: BLE001 - the hook reports any failure as its exit status
        entry.update(hf_dir=str(args.hf_dir), ok=False, error=f"{type(exc).__name__}: {exc}")
    line = json.dumps(entry)
    print(line, flush=True)
    log = args.log or args.hf_dir.parent / "smoke.jsonl"
    try:
        with open(log, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as exc:
        print(f"cannot append to {log}: {exc}", file=sys.stderr)
    return 0 if entry["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
