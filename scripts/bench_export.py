"""Benchmark molgen_export against what the machine allows, on a TorchTitan-layout Qwen3 checkpoint.

Builds (once, in --workdir) a checkpoint with real Qwen3 shapes for a flavor and made-up weights, laid out the
way TorchTitan saves it (model FQNs, then the flattened AdamW state, scheduler, dataloader and train state,
one `dcp.save` so one `.metadata`), then times in the same run, alternating A [V] [T] B C per round:

  A  the export (`python -m molgen_export ... --skip-logits`), as a subprocess;
  V  with --verify, the default verified export (logit check on);
  T  with --reader-threads 1,2,4, the export A with each reader thread count;
  B  the streaming reference: a minimal read-cast-write of the same model bytes (one thread, 64 MB reads with
     the next block hinted to the kernel, reused buffers, one output file, fsync), as a subprocess, then `sync`;
  C  `cp -r` of the step folder, then `sync` (timed apart: cp returns with the dirty pages the export fsyncs).

The page cache is dropped before each run when permitted. Peak RSS comes from `os.wait4`. Prints the
contenders side by side and the ratios the targets are stated in (docs/PERFORMANCE.md) and writes
`results-<flavor>.json` in the workdir.

    python scripts/bench_export.py --flavor 0.6B --workdir /tmp/bench
    python scripts/bench_export.py --flavor 1.7B --workdir /tmp/bench --verify
    python scripts/bench_export.py --flavor 8B --model-only --dtype bfloat16 --workdir /tmp/bench
    python scripts/bench_export.py --flavor 0.6B --workdir /tmp/bench --reader-threads 1,2,4
    python scripts/bench_export.py --flavor tiny --workdir /tmp/bench-smoke --repeats 1   # seconds; CI smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PIECE = 64 << 20


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- the checkpoint

def flavor_arch(flavor: str):
    """A `Qwen3Arch` with the real dims of a torchtitan Qwen3 flavor (`tiny`: the demo's tiny model)."""
    from molgen_export.mapping.architecture import Qwen3Arch, dims_from_flavor
    from molgen_export.demo import tiny_arch

    if flavor == "tiny":
        return tiny_arch()
    dims = dims_from_flavor("qwen3", flavor)
    if dims is None:
        raise SystemExit(f"unknown Qwen3 flavor {flavor!r}")
    return Qwen3Arch(vocab_size=dims.vocab_size, dim=dims.dim, n_layers=dims.n_layers, n_heads=dims.n_heads,
                     n_kv_heads=dims.n_kv_heads, head_dim=dims.head_dim, hidden_dim=dims.hidden_dim,
                     norm_eps=dims.norm_eps or 1e-6, rope_theta=dims.rope_theta or 1e6,
                     max_seq_len=dims.max_seq_len or 4096, tie_word_embeddings=bool(dims.tie_word_embeddings))


def titan_layout(arch, *, model_only: bool, dtype) -> dict:
    """The state dict TorchTitan saves for `arch`, with zero-stride placeholders of the real shapes.

    Keys come from TorchTitan itself: the model's `ModelWrapper` state dict (real dims, on the meta device) and
    the flattened AdamW state of a same-depth tiny model after one step (`demo.titan_checkpoint_state`).
    """
    import dataclasses

    import torch
    from torchtitan.components.checkpointer.base import ModelWrapper

    from molgen_export.demo import build_model, titan_checkpoint_state

    with torch.device("meta"):
        real = arch.titan_model_config(fused_qkv=True).build()
    model_shapes = {k: tuple(v.shape) for k, v in ModelWrapper(real).state_dict().items()}
    param_shapes = {k: tuple(v.shape) for k, v in real.named_parameters(remove_duplicate=False)}

    def placeholder(shape: tuple[int, ...], kind: torch.dtype) -> torch.Tensor:
        return torch.zeros((), dtype=kind) if not shape else torch.zeros(1, dtype=kind).expand(*shape)

    state = {k: placeholder(s, dtype) for k, s in model_shapes.items()}
    if model_only:
        return state
    tiny = dataclasses.replace(arch, vocab_size=64, dim=16, n_heads=2, n_kv_heads=1, head_dim=8, hidden_dim=32)
    model = build_model(tiny, fused_qkv=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    template = titan_checkpoint_state(model, optimizer, step=1000)
    for key, value in template.items():
        if key in model_shapes:
            continue
        if key == "optimizer":
            flat = {}
            for name, item in value.items():
                if isinstance(item, torch.Tensor):
                    fqn = name.split(".", 1)[1].rsplit(".", 1)[0]
                    shape = param_shapes.get(fqn, ()) if item.dim() else ()
                    flat[name] = placeholder(shape, torch.float32)
                else:
                    flat[name] = item
            state["optimizer"] = flat
        else:
            state[key] = value
    return state


QWEN3_PADDED_ROWS = 267
"""Qwen3's embedding has 151936 rows for 151669 token ids."""


def pad_tokenizer(path: Path, ids: int) -> int:
    """Grow a BPE tokenizer's vocabulary to `ids` entries (unreachable extra tokens), so the logit check compares
    as many head rows as with a real Qwen3 tokenizer. Returns the new size."""
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    taken = set(vocab.values()) | {t["id"] for t in data.get("added_tokens", [])}
    next_id = 0
    while len(taken) < ids:
        while next_id in taken:
            next_id += 1
        vocab[f"<|bench_extra_{next_id}|>"] = next_id
        taken.add(next_id)
    path.write_text(json.dumps(data))
    return len(taken)


def _make_planner(arch, seed: int):
    import torch
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    pool = torch.randn(1 << 22, generator=torch.Generator().manual_seed(seed)).mul_(0.02)

    class MadeUpWeights(DefaultSavePlanner):
        """Makes each tensor's values when DCP asks for them, so the whole checkpoint never sits in memory."""

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            fqn = write_item.index.fqn
            props = write_item.tensor_data.properties
            shape = tuple(write_item.tensor_data.size)
            if fqn == "lm_head.weight" and arch.tie_word_embeddings:
                fqn = "tok_embeddings.weight"  # TorchTitan saves the tied tensor under both names
            out = torch.empty(shape, dtype=torch.float32)
            flat = out.view(-1)
            if fqn.endswith("norm.weight"):
                flat.fill_(1.0)
            elif flat.numel():
                start = sum(map(ord, fqn)) % pool.numel()
                done = 0
                while done < flat.numel():
                    n = min(flat.numel() - done, pool.numel() - start)
                    flat[done:done + n].copy_(pool[start:start + n])
                    done += n
                    start = 0
            return out.to(props.dtype)

    return MadeUpWeights()


def build_checkpoint(workdir: Path, flavor: str, *, model_only: bool, dtype_name: str, seed: int = 0) -> Path:
    """Write `workdir/run/checkpoint/step-1000` (TorchTitan layout), assets and the run config; skip if present."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    from molgen_export.demo import job_config_dict, make_tokenizer, write_base_assets
    from molgen_export.mapping.run_config import write_checkpoint_config

    arch = flavor_arch(flavor)
    checkpoint_root = workdir / "run" / "checkpoint"
    step_dir = checkpoint_root / "step-1000"
    checkpoint_root.mkdir(parents=True, exist_ok=True)
    assets = workdir / "assets"
    size = make_tokenizer(assets, 300, seed)
    if flavor != "tiny":
        size = pad_tokenizer(assets / "tokenizer.json", arch.vocab_size - QWEN3_PADDED_ROWS)
    write_base_assets(assets, arch, eos_id=0)
    job = workdir / "run" / "job_config.json"
    job.write_text(json.dumps(job_config_dict(arch, flavor=flavor if flavor != "tiny" else "molgen_tiny",
                                              hf_assets_path="./assets", dump_folder="./run", seq_len=4096)))
    write_checkpoint_config(checkpoint_root, job, launch_dir=workdir)
    if (step_dir / ".metadata").is_file():
        return step_dir
    if step_dir.exists():
        shutil.rmtree(step_dir)
    started = time.perf_counter()
    state = titan_layout(arch, model_only=model_only, dtype=getattr(torch, dtype_name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(step_dir)), planner=_make_planner(arch, seed))
    log(f"built {flavor} checkpoint ({'model only' if model_only else 'with AdamW state'}, {dtype_name}, "
        f"tokenizer {size} ids) in {time.perf_counter() - started:.1f} s")
    return step_dir


# ------------------------------------------------------------------------------------------------- the runs

BASELINE = r"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
plan, target, dtype = json.loads(open(sys.argv[1]).read()), sys.argv[2], getattr(torch, sys.argv[3])
piece = %d
read_buf = bytearray(piece)
cast_buf = torch.empty(piece, dtype=torch.uint8)
fds = {}
with open(target, "wb") as out:
    for path, offset, length, src_dtype in plan:
        fd = fds.get(path)
        if fd is None:
            fd = fds[path] = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        src_dtype = getattr(torch, src_dtype)
        done = 0
        while done < length:
            n = min(piece, length - done)
            os.posix_fadvise(fd, offset + done + n, piece, os.POSIX_FADV_WILLNEED)  # the next block, while we work
            view = memoryview(read_buf)[:n]
            got = 0
            while got < n:
                got += os.preadv(fd, [view[got:]], offset + done + got)
            src = torch.frombuffer(read_buf, dtype=torch.uint8, count=n).view(src_dtype)
            if src_dtype == dtype:
                out.write(view)
            else:
                dst = cast_buf[:src.numel() * dtype.itemsize].view(dtype)
                dst.copy_(src)
                out.write(memoryview(dst.view(torch.uint8).numpy()))
            done += n
    out.flush()
    os.fsync(out.fileno())
""" % PIECE


def copy_plan(step_dir: Path) -> tuple[list, int]:
    """(file, offset, length, dtype) of every model tensor's storage bytes, and the model bytes in the step."""
    from molgen_export.dcp import read

    meta = read.read_step_metadata(step_dir)
    plan = []
    for fqn, entry in meta.model.items():
        for index, chunk in enumerate(entry.chunks):
            record = read.chunk_record(meta, fqn, index)
            if record is None:
                raise SystemExit(f"{fqn}: not a plain torch.save record")
            plan.append((str(step_dir / chunk.relative_path), chunk.file_offset + record.data_offset, record.nbytes,
                         str(entry.dtype).removeprefix("torch.")))
    plan.sort()
    return plan, meta.model_bytes


COLD = {"what": "all"}
"""What `drop_caches` evicts: `all` (the whole page cache, Python's own files included: a first run on a node) or
`step` (only the step folder's files: a node that has run Python before, as a watcher's or a launcher's has)."""


def drop_caches() -> bool:
    os.sync()
    if COLD["what"] == "step":
        for path in Path(COLD["step_dir"]).iterdir():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return True
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def run_measured(command: list[str], env: dict | None = None) -> dict:
    """Run a command with os.wait4 so the child's own peak RSS is known."""
    import threading

    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    chunks: dict[str, list[bytes]] = {"out": [], "err": []}

    def drain(stream, key):
        for block in iter(lambda: stream.read(65536), b""):
            chunks[key].append(block)

    threads = [threading.Thread(target=drain, args=(proc.stdout, "out")),
               threading.Thread(target=drain, args=(proc.stderr, "err"))]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    for t in threads:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "returncode": proc.returncode, "peak_rss_mb": usage.ru_maxrss / 1024,
            "stdout": b"".join(chunks["out"]).decode(), "stderr": b"".join(chunks["err"]).decode()[-4000:]}


def run_export(step_dir: Path, out_root: Path, *, verify: bool, dtype: str | None,
               reader_threads: int | None = None) -> dict:
    if out_root.exists():
        shutil.rmtree(out_root)
    command = [sys.executable, "-m", "molgen_export", "--dcp-path", str(step_dir), "--output", str(out_root),
               "--json", "-q"]
    if not verify:
        command.append("--skip-logits")
    if dtype:
        command += ["--dtype", dtype]
    if reader_threads:
        command += ["--reader-threads", str(reader_threads)]
    result = run_measured(command)
    if result["returncode"] != 0:
        raise SystemExit(f"export failed ({result['returncode']}):\n{result['stderr']}")
    reports = json.loads(result["stdout"])
    report = reports[0] if isinstance(reports, list) else reports
    result.update(bytes_read=report["bytes_read"], model_bytes=report["model_bytes"],
                  other_bytes=report["other_bytes"], output_bytes=report["output_bytes"],
                  timings=report["timings"], read_paths=report.get("read_paths"), fidelity=report.get("fidelity"))
    result.pop("stdout")
    shutil.rmtree(out_root)
    return result


WARM = r"""
import json, os, shutil, sys, time
from pathlib import Path
from molgen_export.options import ExportOptions
from molgen_export.pipeline.export import export_step
step, out, dtype = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
export_step(step, ExportOptions(output=out / "warm-up", skip_logits=True, dtype=dtype))  # imports everything
shutil.rmtree(out / "warm-up")
os.sync()
try:
    open("/proc/sys/vm/drop_caches", "w").write("3\n")
except OSError:
    pass
started = time.perf_counter()
report = export_step(step, ExportOptions(output=out / "timed", skip_logits=True, dtype=dtype))
print(json.dumps({"export_s": time.perf_counter() - started, "timings": report.timings}))
"""


def run_warm(step_dir: Path, out_root: Path, dtype: str) -> dict:
    """One export in a process that already exported once (imports done): what a watcher pays per step."""
    if out_root.exists():
        shutil.rmtree(out_root)
    result = run_measured([sys.executable, "-c", WARM, str(step_dir), str(out_root), dtype])
    if result["returncode"] != 0:
        raise SystemExit(f"warm export failed:\n{result['stderr']}")
    result.update(json.loads(result.pop("stdout").strip().splitlines()[-1]))
    shutil.rmtree(out_root)
    return result


def run_baseline(plan_file: Path, target: Path, dtype: str) -> dict:
    result = run_measured([sys.executable, "-c", BASELINE, str(plan_file), str(target), dtype])
    if result["returncode"] != 0:
        raise SystemExit(f"baseline copy failed:\n{result['stderr']}")
    result["sync_s"] = timed_sync()
    result["wall_sync_s"] = result["wall_s"] + result["sync_s"]
    result["output_bytes"] = target.stat().st_size
    target.unlink()
    result.pop("stdout")
    return result


def timed_sync() -> float:
    """Seconds a `sync` takes right after a run: what the run left for the kernel to write."""
    started = time.perf_counter()
    os.sync()
    return time.perf_counter() - started


def run_cp(step_dir: Path, target: Path) -> dict:
    if target.exists():
        shutil.rmtree(target)
    result = run_measured(["cp", "-r", str(step_dir), str(target)])
    result["sync_s"] = timed_sync()  # cp returns with dirty pages the export would have fsynced
    result["wall_sync_s"] = result["wall_s"] + result["sync_s"]
    result.pop("stdout")
    shutil.rmtree(target)
    return result


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="tiny", help="torchtitan Qwen3 flavor (0.6B, 1.7B, 4B, 8B, ...) or tiny")
    parser.add_argument("--workdir", type=Path, required=True, help="where the checkpoint and outputs go")
    parser.add_argument("--model-only", action="store_true", help="save the model only (no optimizer state)")
    parser.add_argument("--dtype", default="float32", help="checkpoint dtype of the model tensors")
    parser.add_argument("--export-dtype", default="bfloat16", help="export dtype")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of A B C")
    parser.add_argument("--verify", action="store_true", help="also time the export with the logit check on, "
                                                               "each round")
    parser.add_argument("--no-cp", action="store_true", help="skip the cp -r runs")
    parser.add_argument("--reader-threads", default="",
                        help="also time the export with each of these reader thread counts, e.g. 1,2,4")
    parser.add_argument("--warm", action="store_true",
                        help="also time an export in a process that already exported once (a watcher's cost)")
    parser.add_argument("--cold", choices=("all", "step"), default="all",
                        help="before each run evict the whole page cache (default) or only the step folder's files")
    parser.add_argument("--clean", action="store_true", help="delete the checkpoint afterwards")
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    if args.prepare:  # the child that imports torch: builds the checkpoint and the copy plan
        step_dir = build_checkpoint(workdir, args.flavor, model_only=args.model_only, dtype_name=args.dtype)
        plan, model_bytes = copy_plan(step_dir)
        (workdir / "copy-plan.json").write_text(json.dumps({"step_dir": str(step_dir), "model_bytes": model_bytes,
                                                             "plan": plan}))
        return 0
    # This process stays small (no torch): a child's peak RSS from wait4 includes its parent's at fork time.
    subprocess.run([sys.executable, __file__, "--prepare", *(argv if argv is not None else sys.argv[1:])], check=True)
    prepared = json.loads((workdir / "copy-plan.json").read_text())
    step_dir, model_bytes = Path(prepared["step_dir"]), prepared["model_bytes"]
    plan_file = workdir / "copy-plan-ranges.json"
    plan_file.write_text(json.dumps(prepared["plan"]))
    step_bytes = sum(p.stat().st_size for p in step_dir.iterdir())
    COLD.update(what=args.cold, step_dir=str(step_dir))
    dropped = drop_caches()
    log(f"step folder {step_bytes / 1e9:.2f} GB, model bytes {model_bytes / 1e9:.2f} GB; page cache "
        f"{('dropped' if args.cold == 'all' else 'of the step folder dropped') if dropped else 'NOT dropped'} "
        "before each run")

    runs: dict[str, list[dict]] = {"export": [], "verified": [], "warm": [], "copy": [], "cp": []}
    threads = [int(t) for t in args.reader_threads.split(",")] if args.reader_threads else []
    runs.update({f"threads-{n}": [] for n in threads})
    for round_index in range(args.repeats):
        # alternate the contenders within each round, so that the machine's load moves them alike
        drop_caches()
        runs["export"].append(run_export(step_dir, workdir / "out-export", verify=False, dtype=args.export_dtype))
        runs["export"][-1]["wall_sync_s"] = runs["export"][-1]["wall_s"] + timed_sync()
        log(f"round {round_index + 1}: export --skip-logits {runs['export'][-1]['wall_s']:.2f} s, "
            f"{runs['export'][-1]['peak_rss_mb']:.0f} MB")
        if args.verify:
            drop_caches()
            runs["verified"].append(run_export(step_dir, workdir / "out-verify", verify=True, dtype=args.export_dtype))
            log(f"round {round_index + 1}: verified export {runs['verified'][-1]['wall_s']:.2f} s, "
                f"{runs['verified'][-1]['peak_rss_mb']:.0f} MB")
        for n in threads:
            drop_caches()
            runs[f"threads-{n}"].append(run_export(step_dir, workdir / "out-threads", verify=False,
                                                   dtype=args.export_dtype, reader_threads=n))
            log(f"round {round_index + 1}: export --skip-logits --reader-threads {n} "
                f"{runs[f'threads-{n}'][-1]['wall_s']:.2f} s")
        if args.warm:
            runs["warm"].append(run_warm(step_dir, workdir / "out-warm", args.export_dtype))
            log(f"round {round_index + 1}: export in a warm process {runs['warm'][-1]['export_s']:.2f} s")
        drop_caches()
        runs["copy"].append(run_baseline(plan_file, workdir / "out-copy.bin", args.export_dtype))
        log(f"round {round_index + 1}: streaming reference {runs['copy'][-1]['wall_s']:.2f} s "
            f"(+ sync {runs['copy'][-1]['sync_s']:.2f} s)")
        if not args.no_cp:
            drop_caches()
            runs["cp"].append(run_cp(step_dir, workdir / "out-cp"))
            log(f"round {round_index + 1}: cp -r {runs['cp'][-1]['wall_s']:.2f} s "
                f"(+ sync {runs['cp'][-1]['sync_s']:.2f} s)")

    export_wall = median(runs["export"], "wall_s")
    copy_wall = median(runs["copy"], "wall_s")
    copy_sync = median(runs["copy"], "wall_sync_s")
    cp_wall = median(runs["cp"], "wall_s") if runs["cp"] else None
    cp_sync = median(runs["cp"], "wall_sync_s") if runs["cp"] else None
    last = runs["export"][-1]
    summary = {
        "flavor": args.flavor, "model_only": args.model_only, "checkpoint_dtype": args.dtype,
        "export_dtype": args.export_dtype, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "page_cache_dropped": dropped,
        "cold": args.cold,
        "repeats": args.repeats,
        "step_bytes": step_bytes, "model_bytes": model_bytes, "bytes_read": last["bytes_read"],
        "read_ratio": last["bytes_read"] / model_bytes, "read_paths": last["read_paths"],
        "output_bytes": last["output_bytes"],
        "export_wall_s": export_wall, "export_walls": [r["wall_s"] for r in runs["export"]],
        "export_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["export"]),
        "export_timings": last["timings"],
        "export_gb_per_s": model_bytes / export_wall / 1e9,
        "copy_wall_s": copy_wall, "copy_walls": [r["wall_s"] for r in runs["copy"]],
        "copy_wall_sync_s": copy_sync,
        "copy_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["copy"]),
        "copy_gb_per_s": model_bytes / copy_wall / 1e9,
        "cp_wall_s": cp_wall, "cp_walls": [r["wall_s"] for r in runs["cp"]], "cp_wall_sync_s": cp_sync,
        "ratio_vs_copy": export_wall / copy_wall,
        "ratio_vs_copy_sync": export_wall / copy_sync,
        "warm_export_s": median(runs["warm"], "export_s") if runs["warm"] else None,
        "warm_exports_s": [r["export_s"] for r in runs["warm"]],
        "warm_ratio_vs_copy": median(runs["warm"], "export_s") / copy_wall if runs["warm"] else None,
        "ratio_vs_cp": export_wall / cp_wall if cp_wall else None,
        "ratio_vs_cp_sync": export_wall / cp_sync if cp_sync else None,
        "reader_threads": {n: {"wall_s": median(runs[f"threads-{n}"], "wall_s"),
                               "walls": [r["wall_s"] for r in runs[f"threads-{n}"]],
                               "read_io_s": median([r["timings"] for r in runs[f"threads-{n}"]], "stream.read_io"),
                               "read_wait_s": median([r["timings"] for r in runs[f"threads-{n}"]], "stream.read_wait")}
                           for n in threads},
    }
    if runs["verified"]:
        verified = runs["verified"]
        verify_wall = median(verified, "wall_s")
        verify_s = statistics.median(r["timings"].get("verify_logits", 0.0) for r in verified)
        summary.update(verify_wall_s=verify_wall, verify_walls=[r["wall_s"] for r in verified],
                       verify_peak_rss_mb=max(r["peak_rss_mb"] for r in verified),
                       verify_logits_s=verify_s, verify_ratio=verify_s / max(1e-9, verify_wall - verify_s),
                       verified_over_skip=verify_wall / export_wall,
                       verify_timings=verified[-1]["timings"], fidelity=verified[-1]["fidelity"])
    (workdir / f"results-{args.flavor}{'' if args.cold == 'all' else '-cold-step'}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(markdown(summary))
    if args.clean:
        shutil.rmtree(step_dir)
    return 0


def markdown(s: dict) -> str:
    """The summary as Markdown: the contenders side by side, then the ratios the targets are stated in."""
    gb = 1e9
    case = f"{s['flavor']}{' model-only' if s['model_only'] else ''} {s['checkpoint_dtype']} -> {s['export_dtype']}"
    verified = (f"{s['verify_wall_s']:.2f} s, {s['verify_peak_rss_mb']:.0f} MB" if "verify_wall_s" in s else "-")
    cp = f"{s['cp_wall_s']:.2f} s ({s['cp_wall_sync_s']:.2f} s with sync)" if s["cp_wall_s"] else "-"
    lines = ["| case | step folder | model bytes (read) | molgen `--skip-logits` | molgen verified | "
             "streaming reference | `cp -r` |",
             "|---|---|---|---|---|---|---|",
             f"| {case} | {s['step_bytes'] / gb:.2f} GB | {s['model_bytes'] / gb:.2f} GB ({s['read_ratio']:.4f}x) | "
             f"{s['export_wall_s']:.2f} s, {s['export_peak_rss_mb']:.0f} MB | {verified} | "
             f"{s['copy_wall_s']:.2f} s ({s['copy_wall_sync_s']:.2f} s with sync), {s['copy_peak_rss_mb']:.0f} MB | "
             f"{cp} |",
             "", "| ratio | value |", "|---|---|",
             f"| skip-logits / streaming reference with sync | {s['ratio_vs_copy_sync']:.2f} |",
             f"| skip-logits / streaming reference | {s['ratio_vs_copy']:.2f} |"]
    if s["cp_wall_s"]:
        lines += [f"| skip-logits / (`cp -r` + sync) | {s['ratio_vs_cp_sync']:.2f} |",
                  f"| skip-logits / `cp -r` | {s['ratio_vs_cp']:.2f} |"]
    if "verify_wall_s" in s:
        lines += [f"| verified / skip-logits | {s['verified_over_skip']:.2f} |",
                  f"| verify_logits / rest of the verified export | {s['verify_ratio']:.2f} |"]
    if s.get("warm_export_s"):
        lines += [f"| warm process (imports done) / streaming reference | {s['warm_ratio_vs_copy']:.2f} |"]
    if s.get("reader_threads"):
        lines += ["", "| reader threads | skip-logits wall | readers in reads | writer waiting for data |",
                  "|---|---|---|---|"]
        lines += [f"| {n} | {t['wall_s']:.2f} s | {t['read_io_s']:.2f} s | {t['read_wait_s']:.2f} s |"
                  for n, t in s["reader_threads"].items()]
    if "fidelity" in s:
        lines += ["", f"Verified export: max abs logit diff {s['fidelity']['max_abs_diff']:.3g}, mode "
                      f"{s['fidelity'].get('mode')}, verify_logits {s['verify_logits_s']:.2f} s."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
