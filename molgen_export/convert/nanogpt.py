"""nanoGPT / GPT-2 `.pt` checkpoint -> HF GPT-2 folder (`GPT2LMHeadModel`), verified.

Reads `ckpt['model']` and `ckpt['model_args']` with `torch.load(weights_only=True)` (memory-mapped, so the
optimizer state beside them is never paged in), strips `_orig_mod.`, drops the causal-mask buffers, transposes the
four `nn.Linear` weights into HF's `Conv1D` `[in, out]` layout, checks the tied head equals `wte` before dropping it,
and writes `model.safetensors`, `config.json`, `generation_config.json`, a README and (from `--tokenizer`) the
tokenizer files, published with one rename. Before publishing, the folder is loaded with transformers and its
logits are compared with a forward pass of nanoGPT's own math on the same rounded weights.

nanoGPT uses exact GELU (`nn.GELU()`), so the config says `activation_function="gelu"` (GPT-2's default
`gelu_new` is the tanh approximation). A `bias=False` model gets zero biases, which computes the same function.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from molgen_export.verify import checks
from molgen_export.pipeline import export
from molgen_export.pipeline.timing import Timer
from molgen_export.verify import logit_gate
from molgen_export.hf import config_files
from molgen_export.hf import safetensors_writer
from molgen_export.hf import publish
from molgen_export.hf.publish import check_output_dir, staged_output
from molgen_export.options import EXPORT_DTYPES
from molgen_export.errors import CheckpointFormatError, ConfigError, MappingError, UsageError
from molgen_export.convert.weights_folder import load_bin
from molgen_export.convert.read_back import finite_logits, logits_finding

logger = logging.getLogger(__name__)

REPORT_FILE = "conversion_report.json"
WRAPPER_PREFIXES = ("_orig_mod.",)
"""Key prefixes torch.compile adds (nanoGPT saves the compiled model's state dict as is)."""
SKIPPED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
"""Causal-mask buffers of the non-flash attention path; not weights."""
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
"""nanoGPT `nn.Linear` weights (`[out, in]`) that HF GPT-2 stores as `Conv1D` weights (`[in, out]`)."""

# Per-block tensors: (name under transformer.h.N., shape from (n_embd) -> shape, is a bias added when bias=False)
BLOCK_TENSORS: tuple[tuple[str, str, bool], ...] = (
    ("ln_1.weight", "C", False),
    ("ln_1.bias", "C", True),
    ("attn.c_attn.weight", "3C,C", False),
    ("attn.c_attn.bias", "3C", True),
    ("attn.c_proj.weight", "C,C", False),
    ("attn.c_proj.bias", "C", True),
    ("ln_2.weight", "C", False),
    ("ln_2.bias", "C", True),
    ("mlp.c_fc.weight", "4C,C", False),
    ("mlp.c_fc.bias", "4C", True),
    ("mlp.c_proj.weight", "C,4C", False),
    ("mlp.c_proj.bias", "C", True),
)
TOP_TENSORS: tuple[tuple[str, str, bool], ...] = (
    ("transformer.wte.weight", "V,C", False),
    ("transformer.wpe.weight", "T,C", False),
    ("transformer.ln_f.weight", "C", False),
    ("transformer.ln_f.bias", "C", True),
)
FP16_MAX = 65504.0
GPT2_EOS_ID = 50256
"""`<|endoftext|>` in the GPT-2 tokenizer: bos and eos of GPT-2 models."""


@dataclass(frozen=True)
class NanoGPTReport:
    """What `convert_nanogpt` did; saved as `conversion_report.json`."""

    source: str
    output_dir: str
    dtype: str
    model_args: dict
    iter_num: int | None
    tied: bool
    tensors: int
    zero_biases: int
    """Biases written as zeros because the model was trained with `bias=False`."""
    vocab_rows: int
    cropped_rows: int
    files: tuple[str, ...]
    findings: tuple[dict, ...]
    fidelity: dict | None
    warnings: tuple[str, ...]
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def read_nanogpt_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, int | None]:
    """The model tensors (wrapper prefixes stripped, mask buffers dropped), `model_args` and `iter_num`.

    Raises:
        UnsafeCheckpointError: the file needs unsafe unpickling (never done).
        CheckpointFormatError: no `model` / `model_args`.
    """
    ckpt = load_bin(Path(path))
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("model_args"), dict):
        keys = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointFormatError(f"{path} is not a nanoGPT checkpoint: expected `model` and `model_args` "
                                    f"entries, found {keys}", path=path,
                                    hint="save it as nanoGPT's train.py does: {'model': ..., 'model_args': ...}")
    state: dict[str, torch.Tensor] = {}
    for key, tensor in ckpt["model"].items():
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.endswith(SKIPPED_SUFFIXES) or not isinstance(tensor, torch.Tensor):
            continue
        state[key] = tensor
    iter_num = ckpt.get("iter_num")
    return state, dict(ckpt["model_args"]), int(iter_num) if isinstance(iter_num, int) else None


def _shape(spec: str, sizes: dict[str, int]) -> tuple[int, ...]:
    def dim(part: str) -> int:
        factor = int(part[:-1]) if len(part) > 1 else 1
        return factor * sizes[part[-1]]
    return tuple(dim(p) for p in spec.split(","))


def plan_hf_tensors(state: dict[str, torch.Tensor], args: dict, path: Path) -> tuple[dict[str, tuple], list[str], bool]:
    """HF key -> (nanoGPT key or None for a zero bias, expected nanoGPT shape); the zero-bias keys; whether tied.

    Raises:
        ConfigError: model_args contradict the tensors.
        MappingError: unknown or missing tensors.
    """
    wte = state.get("transformer.wte.weight")
    wpe = state.get("transformer.wpe.weight")
    if wte is None or wpe is None:
        raise MappingError(f"{path} has no transformer.wte.weight / transformer.wpe.weight", hint="not a GPT checkpoint")
    try:
        sizes = {"C": int(args["n_embd"]), "V": int(args.get("vocab_size") or wte.shape[0]),
                 "T": int(args.get("block_size") or wpe.shape[0])}
        n_layer, n_head = int(args["n_layer"]), int(args["n_head"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: model_args {args} lack n_layer/n_head/n_embd ({exc})", path=path,
                          hint="the checkpoint's model_args must be nanoGPT's GPTConfig fields") from exc
    if sizes["C"] % n_head:
        raise ConfigError(f"{path}: n_embd={sizes['C']} is not divisible by n_head={n_head}", path=path)
    bias = bool(args.get("bias", True))
    plan: dict[str, tuple] = {}
    zero_biases: list[str] = []
    tables = [("", TOP_TENSORS)] + [(f"transformer.h.{i}.", BLOCK_TENSORS) for i in range(n_layer)]
    for prefix, table in tables:
        for name, spec, is_bias in table:
            key = prefix + name
            if is_bias and not bias and key not in state:
                zero_biases.append(key)
                plan[key] = (None, _shape(spec, sizes))
            else:
                plan[key] = (key, _shape(spec, sizes))
    head = state.get("lm_head.weight")
    tied = head is None or (head.shape == wte.shape and torch.equal(head, wte))
    if not tied:
        plan["lm_head.weight"] = ("lm_head.weight", tuple(wte.shape))
    unknown = sorted(set(state) - {src for src, _ in plan.values() if src} - {"lm_head.weight"})
    missing = sorted(src for src, _ in plan.values() if src and src not in state)
    wrong = [f"`{src}` is {list(state[src].shape)}, model_args say {list(shape)}"
             for src, shape in plan.values() if src in state and tuple(state[src].shape) != shape]
    if unknown or missing:
        raise MappingError(f"{path}: " + "; ".join(p for p in (f"tensors with no GPT-2 place: {unknown[:8]}" if unknown
                                                             else "", f"missing tensors: {missing[:8]}" if missing
                                                             else "") if p),
                           hint="the checkpoint is not a nanoGPT GPT with these model_args")
    if wrong:
        raise ConfigError(f"{path}: " + "; ".join(wrong[:6]), path=path,
                          hint="model_args do not describe these tensors; fix model_args in the checkpoint")
    return plan, zero_biases, tied


def build_gpt2_config(args: dict, *, vocab_rows: int, tied: bool, dtype: str, special_ids: dict) -> dict:
    """`config.json` for `GPT2LMHeadModel` from nanoGPT's model_args."""
    from transformers import GPT2Config

    dropout = float(args.get("dropout", 0.0))
    config = GPT2Config(
        vocab_size=vocab_rows, n_positions=int(args["block_size"]), n_embd=int(args["n_embd"]),
        n_layer=int(args["n_layer"]), n_head=int(args["n_head"]), activation_function="gelu",
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, layer_norm_epsilon=1e-5,
        tie_word_embeddings=tied, bos_token_id=special_ids.get("bos_token_id"),
        eos_token_id=special_ids.get("eos_token_id"))
    data = config.to_dict()
    data.pop("transformers_version", None)
    data.update({"architectures": ["GPT2LMHeadModel"], "dtype": dtype, "torch_dtype": dtype})
    return dict(sorted(data.items()))


def _special_ids(tokenizer_dir: Path | None, vocab_rows: int) -> dict:
    if tokenizer_dir is not None:
        ids = {k: v for k, v in config_files.special_token_ids(tokenizer_dir).items() if v is not None}
        vocab_path = tokenizer_dir / "vocab.json"
        if not ids and vocab_path.is_file():
            eos = json.loads(vocab_path.read_text()).get("<|endoftext|>")
            ids = {"bos_token_id": eos, "eos_token_id": eos} if eos is not None else {}
        return ids
    return {"bos_token_id": GPT2_EOS_ID, "eos_token_id": GPT2_EOS_ID} if vocab_rows > GPT2_EOS_ID else {}


def _tokenizer_size(tokenizer_dir: Path) -> int | None:
    size = config_files.tokenizer_size(tokenizer_dir)
    vocab_path = tokenizer_dir / "vocab.json"
    if size is None and vocab_path.is_file():
        ids = list(json.loads(vocab_path.read_text()).values())
        added = tokenizer_dir / "added_tokens.json"
        if added.is_file():
            ids += list(json.loads(added.read_text()).values())
        size = max(ids) + 1 if ids else 0
    return size


class NanoGPTReference(torch.nn.Module):
    """nanoGPT's `GPT.forward` math (float32) on nanoGPT-layout tensors: the reference the HF folder must match."""

    def __init__(self, tensors: dict[str, torch.Tensor], n_layer: int, n_head: int):
        super().__init__()
        self.tensors = {k: v.float() for k, v in tensors.items()}
        self.n_layer, self.n_head = n_layer, n_head
        self.finite = True

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        w = self.tensors
        batch, length = tokens.shape
        width = w["transformer.wte.weight"].shape[1]
        x = w["transformer.wte.weight"][tokens] + w["transformer.wpe.weight"][:length]
        for i in range(self.n_layer):
            p = f"transformer.h.{i}."
            h = F.layer_norm(x, (width,), w[p + "ln_1.weight"], w[p + "ln_1.bias"], 1e-5)
            q, k, v = F.linear(h, w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"]).split(width, dim=2)
            q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, length, width)
            x = x + F.linear(y, w[p + "attn.c_proj.weight"], w[p + "attn.c_proj.bias"])
            h = F.layer_norm(x, (width,), w[p + "ln_2.weight"], w[p + "ln_2.bias"], 1e-5)
            h = F.gelu(F.linear(h, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"]))
            x = x + F.linear(h, w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
        x = F.layer_norm(x, (width,), w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], 1e-5)
        logits = F.linear(x, w.get("lm_head.weight", w["transformer.wte.weight"]))
        self.finite = self.finite and finite_logits(logits)
        return logits


def convert_nanogpt(checkpoint: Path, output_dir: Path, *, dtype: str = "float32", vocab_size: int | None = None,
                    tokenizer_dir: Path | None = None, verify: bool = True, logits_atol: float = 1e-3,
                    force: bool = False) -> NanoGPTReport:
    """Convert a nanoGPT checkpoint into a verified HF GPT-2 folder (see the module docstring).

    Args:
        checkpoint: the `.pt` file nanoGPT's train.py saved.
        output_dir: the folder to create.
        dtype: `float32` (default), `bfloat16` or `float16` (values beyond +-65504 are reported: they become inf).
        vocab_size: keep only the first N embedding rows (e.g. 50257 of nanoGPT's padded 50304).
        tokenizer_dir: a folder whose tokenizer files (allow-listed) are copied.
        verify: compare HF logits with nanoGPT's forward pass on the same rounded weights.
        logits_atol: accepted max|logit difference| relative to max|logit|.
        force: replace an existing, non-empty `output_dir`.

    Raises:
        MolgenExportError: any refusal or failed check; nothing is published then.
    """
    if dtype not in export.DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}", hint=f"use one of {', '.join(EXPORT_DTYPES)}")
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    check_output_dir(output_dir, force=force)
    timings: dict[str, float] = {}
    timer = Timer(timings)
    started = time.perf_counter()
    with timer.stage("read"):
        state, args, iter_num = read_nanogpt_checkpoint(checkpoint)
        plan, zero_biases, tied = plan_hf_tensors(state, args, checkpoint)
    args.setdefault("block_size", plan["transformer.wpe.weight"][1][0])
    rows = plan["transformer.wte.weight"][1][0]
    keep_rows = rows if vocab_size is None else vocab_size
    if not 0 < keep_rows <= rows:
        raise UsageError(f"--vocab-size {vocab_size} is outside the checkpoint's {rows} embedding rows",
                         hint=f"pass a number between 1 and {rows}")
    findings = [checks.Finding("tied_weights", True, "lm_head equals wte bit for bit (or is absent): written tied, "
                               "lm_head dropped" if tied else "lm_head differs from wte: written untied")]
    tokenizer_files: list[Path] = []
    if tokenizer_dir is not None:
        tokenizer_files = config_files.tokenizer_files(Path(tokenizer_dir))
        findings.append(checks.check_vocab_padding(keep_rows, _tokenizer_size(Path(tokenizer_dir))))
    checks.raise_on_failures(findings, checkpoint.name)

    torch_dtype = export.DTYPES[dtype]
    warnings: list[str] = []
    nonfinite: list[tuple[str, str, int, int]] = []
    rounded: dict[str, torch.Tensor] = {}  # nanoGPT layout, rounded to the export dtype: the reference's weights
    planned: list[safetensors_writer.PlannedTensor] = []
    for hf_key, (nanogpt_key, shape) in plan.items():
        if hf_key in ("transformer.wte.weight", "lm_head.weight"):
            shape = (keep_rows, *shape[1:])
        transposed = hf_key.endswith(CONV1D_WEIGHTS)
        planned.append(safetensors_writer.PlannedTensor(hf_key, shape[::-1] if transposed else shape, torch_dtype))

    with staged_output(output_dir, force=force) as temp_dir:
        writer = safetensors_writer.SafetensorsWriter(temp_dir, safetensors_writer.plan_shards(planned, 1 << 62))
        try:
            with timer.stage("write"):
                for tensor_plan in planned:
                    nanogpt_key, shape = plan[tensor_plan.hf_key]
                    tensor = state[nanogpt_key] if nanogpt_key else torch.zeros(shape, dtype=torch.float32)
                    if tensor_plan.hf_key in ("transformer.wte.weight", "lm_head.weight"):
                        tensor = tensor[:keep_rows]
                    nan, inf = checks.count_nonfinite(tensor)
                    if nan or inf:
                        nonfinite.append((nanogpt_key or "", tensor_plan.hf_key, nan, inf))
                    if torch_dtype == torch.float16:
                        over = int((tensor.float().abs() > FP16_MAX).sum()) if tensor.is_floating_point() else 0
                        if over:
                            warnings.append(f"`{nanogpt_key}` (HF `{tensor_plan.hf_key}`): {over} value(s) beyond "
                                            f"±{FP16_MAX:.0f} overflow to inf in float16; use --dtype bfloat16")
                            logger.warning(warnings[-1])
                    value = tensor.to(torch_dtype)
                    if verify:
                        rounded[nanogpt_key or tensor_plan.hf_key] = value
                    writer.write(tensor_plan.hf_key, (value.t() if tensor_plan.hf_key.endswith(CONV1D_WEIGHTS)
                                                      else value).contiguous())
                findings.append(checks.nonfinite_finding(nonfinite, len(planned)))
                checks.raise_on_failures(findings, checkpoint.name)
                files = writer.close()
        except BaseException:
            writer.abort()
            raise
        del state
        with timer.stage("assets"):
            special_ids = _special_ids(Path(tokenizer_dir) if tokenizer_dir else None, keep_rows)
            config = build_gpt2_config(args, vocab_rows=keep_rows, tied=tied, dtype=dtype, special_ids=special_ids)
            publish.write_json(temp_dir / "config.json", config)
            publish.write_json(temp_dir / "generation_config.json", dict(sorted(special_ids.items())))
            files += ["config.json", "generation_config.json"] + publish.copy_files(tokenizer_files, temp_dir)
        fidelity_json = None
        with timer.stage("verify"):
            findings.append(logit_gate.check_written_tensors(temp_dir, {t.hf_key: t for t in planned}))
            checks.raise_on_failures(findings, checkpoint.name)
            if verify:
                reference = NanoGPTReference(rounded, int(args["n_layer"]), int(args["n_head"]))
                hf_gpt2 = logit_gate.load_hf_model(temp_dir)
                tokens = logit_gate.fixed_token_batch(keep_rows, length=min(32, int(args["block_size"])))
                result = logit_gate.compare_logits(reference, hf_gpt2, [tokens], keep_rows, tolerance=logits_atol)
                fidelity_json = result.to_json()
                findings.append(logits_finding(result, "nanoGPT forward vs HF GPT2LMHeadModel", finite=reference.finite))
                del hf_gpt2, reference
            else:
                findings.append(checks.Finding("logits", True, "skipped (--skip-logits)", warning=True))
            checks.raise_on_failures(findings, checkpoint.name)
        timings["total"] = round(time.perf_counter() - started, 4)
        report = NanoGPTReport(
            source=str(checkpoint), output_dir=str(output_dir), dtype=dtype, model_args=args, iter_num=iter_num,
            tied=tied, tensors=len(planned), zero_biases=len(zero_biases), vocab_rows=keep_rows,
            cropped_rows=rows - keep_rows, files=tuple(files) + ("README.md", REPORT_FILE),
            findings=tuple(f.to_json() for f in findings), fidelity=fidelity_json, warnings=tuple(warnings),
            timings=timings, versions=export.versions())
        publish.write_text(temp_dir / "README.md", model_card(report))
        publish.write_json(temp_dir / REPORT_FILE, report.to_json())
    logger.info("converted %s -> %s in %.2f s", checkpoint, output_dir, timings["total"])
    return report


def model_card(report: NanoGPTReport) -> str:
    """README.md of the converted folder: source, conversion choices, checks and the logit comparison."""
    args = report.model_args
    lines = ["---", "library_name: transformers", "tags: [gpt2, nanogpt, molgen-export]", "---",
             f"# {Path(report.source).stem} (nanoGPT -> GPT-2)", "",
             f"Converted by molgen_export {report.versions.get('molgen-export', '?')} from the nanoGPT checkpoint "
             f"`{report.source}`" + (f" (iter {report.iter_num})" if report.iter_num is not None else "") + ".", "",
             f"- architecture: {args.get('n_layer')} layers, {args.get('n_head')} heads, n_embd {args.get('n_embd')}, "
             f"block_size {args.get('block_size')}, bias {args.get('bias', True)}",
             f"- dtype: {report.dtype}; tied embeddings: {report.tied}",
             f"- vocabulary: {report.vocab_rows} rows" + (f" ({report.cropped_rows} padded rows cropped)"
                                                         if report.cropped_rows else ""),
             "- activation: exact GELU (`activation_function: gelu`), as nanoGPT's `nn.GELU()`"]
    if report.zero_biases:
        lines.append(f"- {report.zero_biases} biases written as zeros (trained with bias=False)")
    lines += ["", "## Checks", "", "| check | result | detail |", "|---|---|---|"]
    for finding in report.findings:
        lines.append(f"| {finding['name']} | {'ok' if finding['ok'] else 'FAILED'}{' (warning)' if finding['warning'] else ''}"
                     f" | {finding['detail'].replace('|', '/')} |")
    if report.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report.warnings]
    lines += ["", "## Load", "", "```python", "from transformers import GPT2LMHeadModel",
              'model = GPT2LMHeadModel.from_pretrained(path, dtype="auto")', "```", ""]
    return "\n".join(lines)
