"""Preflight: prove from the job config alone, before training starts, that every checkpoint will export.

An export that fails at step 1000 after hours of training is the worst time to learn the run was not exportable.
With no checkpoint yet, the preflight runs the export's own rules on what the checkpoint will hold: it builds
TorchTitan's model from the run's model config on the meta device (its state dict is what DCP will save), maps
every name through the real mapping, builds the HF config from the base assets and loads it with transformers,
checks the tokenizer against the vocab, refuses every setting the export refuses, and compares the disk one
export needs with the free space of the export root. One finding per check, like the dry run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from molgen_export.mapping import architecture
from molgen_export.verify import checks
from molgen_export.hf import config_files
from molgen_export.mapping import keymap
from molgen_export.verify import reference
from molgen_export.mapping import run_config
from molgen_export.options import ExportOptions
from molgen_export.errors import ConfigError, MolgenExportError

logger = logging.getLogger(__name__)

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
DISK_HEADROOM = 2.0
"""Free space wanted, in exports: replacing an export holds the old and the new one for a moment."""


@dataclass
class PreflightResult:
    """The preflight's findings, in order; `ok` when none failed."""

    job_config: Path
    findings: list[checks.Finding] = field(default_factory=list)
    export_bytes: int | None = None

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    def first_failure(self) -> checks.Finding | None:
        return next((f for f in self.findings if not f.ok), None)

    def lines(self) -> list[str]:
        width = max((len(f.name) for f in self.findings), default=0)
        return [f"check {f.name:<{width}} {'ok' if f.ok else 'FAILED'}{' (warning)' if f.warning else ''}  {f.detail}"
                for f in self.findings]

    def to_json(self) -> dict:
        return {"job_config": str(self.job_config), "ok": self.ok, "export_bytes": self.export_bytes,
                "findings": [f.to_json() for f in self.findings]}


def _facts_from_dims(dims: run_config.ModelDims, tie: bool) -> architecture.ShapeFacts:
    moe_layers = tuple(dims.moe_layers or ())
    return architecture.ShapeFacts(
        vocab_size=dims.vocab_size, dim=dims.dim, n_layers=dims.n_layers, n_heads=dims.n_heads,
        n_kv_heads=dims.n_kv_heads or dims.n_heads, head_dim=dims.head_dim,
        hidden_dim=dims.hidden_dim if len(moe_layers) < (dims.n_layers or 0) else None, has_head=not tie,
        num_experts=dims.num_experts if moe_layers else None,
        moe_hidden_dim=dims.moe_hidden_dim if moe_layers else None, moe_layers=moe_layers)


def _export_root(run: run_config.RunConfig, options: ExportOptions) -> Path | None:
    if options.output is not None:
        return options.output
    if run.launch_dir is None:
        return None
    dump = run.source.parent
    # the checkpoint folder sits in the dump folder; the default export root beside it
    folder = run.checkpoint_folder or "checkpoint"
    for candidate in (dump, *dump.parents):
        if (candidate / folder).is_dir() or candidate == run.launch_dir:
            return candidate / f"{folder}-hf"
    return None


def run_preflight(job_config: Path, options: ExportOptions | None = None) -> PreflightResult:
    """Check that checkpoints of the run described by `job_config` can be exported and verified.

    Args:
        job_config: the run's job config (TorchTitan 0.3 `to_dict()` dump, 0.2 TOML/dict, or the runner's file).
        options: the export options the run will use (dtype, assets override, output root).

    Returns:
        The findings; a failed one carries the export's own error message.
    """
    options = options or ExportOptions()
    result = PreflightResult(Path(job_config))
    found = result.findings

    def fail(name: str, exc: MolgenExportError) -> PreflightResult:
        found.append(checks.Finding(name, False, f"{exc}" + (f"; fix: {exc.hint}" if exc.hint else "")))
        return result

    try:
        run = run_config.read_config_file(Path(job_config))
    except MolgenExportError as exc:
        return fail("run_config", exc)
    found.append(checks.Finding("run_config", True, f"{run.source} ({run.kind}), model {run.model_name} "
                                                    f"{run.flavor or ''}".rstrip()))
    assets = options.hf_assets or run.hf_assets_path
    try:
        if assets is None or not assets.is_dir():
            raise ConfigError(f"the base assets folder {assets} does not exist" if assets else
                                         "the run config names no hf_assets_path (or one relative to a launch "
                                         "directory that cannot be told)", hint="pass --hf-assets")
        base = architecture.read_base_hf_config(assets)
        tokenizer_files = config_files.tokenizer_files(assets)
        tokenizer_size = config_files.tokenizer_size(assets)
    except MolgenExportError as exc:
        return fail("base_assets", exc)
    found.append(checks.Finding("base_assets", True, f"{assets}: config.json, "
                                                     f"{', '.join(p.name for p in tokenizer_files)}"))

    try:
        dims = run.dims if run.dims.dim else (architecture.dims_from_flavor(run.model_name, run.flavor)
                                              or architecture.dims_from_hf_config(base))
        if not (dims.dim and dims.n_layers and dims.vocab_size and dims.n_heads and dims.head_dim):
            raise ConfigError(f"{run.source} states no model dims (and its flavor {run.flavor!r} is not in "
                                         "the installed torchtitan's registry)",
                                         hint="the first checkpoint will tell; or pass a TorchTitan 0.3 job config")
        tie = bool(dims.tie_word_embeddings)
        arch, warnings = architecture.resolve_architecture(run, _facts_from_dims(dims, tie), base)
        ref = reference.build_reference(run, arch, checkpoint_fused_qkv=False)
        arch = dataclasses.replace(arch, rope_scaling=ref.rope_scaling)
    except MolgenExportError as exc:
        return fail("run_settings", exc)
    counts = ref.summary()["fields"]
    found.append(checks.Finding("run_settings", True, f"reference from {ref.source}; "
                                + ", ".join(f"{n} {a}" for a, n in sorted(counts.items())) + " fields"
                                + (f"; {'; '.join(warnings)}" if warnings else "")))

    # the state dict DCP will save: TorchTitan's model of this config, built on the meta device
    import torch

    try:
        from molgen_export.mapping import titan

        model = titan.installed().meta_model(ref.with_tie(tie))
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        kept, _buffers = keymap.split_training_buffers(shapes)
        sources, _ = keymap.canonicalize_keys(kept, n_heads=arch.n_heads, n_kv_heads=arch.n_kv_heads,
                                              head_dim=arch.head_dim)
        canonical = {s.grouped_key: shapes[s.checkpoint_key] if s.expert is not None else s.shape
                     for s in sources.values()}
        facts = architecture.facts_from_shapes(canonical)
        architecture.resolve_architecture(run, facts, base)
        mapping = keymap.map_to_hf(sources, arch.titan_model_config())
    except MolgenExportError as exc:
        return fail("key_mapping", exc)
    hf_keys = {mapping[k] for k in sources if not (tie and k == "lm_head.weight")}
    expected = keymap.expected_hf_keys(arch.n_layers, with_head=not tie,
                                       moe_layers=arch.moe.moe_layers if arch.moe else (),
                                       num_experts=arch.moe.num_experts if arch.moe else 0)
    coverage = checks.check_key_coverage(hf_keys, expected)
    found.append(checks.Finding("key_mapping", coverage.ok, f"{len(shapes)} TorchTitan tensors -> "
                                                            f"{coverage.detail}"))

    dtype = options.dtype or run.compute_dtype
    try:
        hf_config = config_files.build_hf_config(base, arch, tie=tie, dtype=dtype)
        found.append(_check_hf_config(hf_config, hf_keys, moe=arch.moe is not None))
    except MolgenExportError as exc:
        return fail("hf_config", exc)
    found.append(checks.check_vocab_padding(arch.vocab_size, tokenizer_size))

    params = sum(int(torch.Size(shape).numel()) for key, shape in shapes.items()
                 if not keymap.TRAINING_BUFFER_RE.match(keymap.canonical_titan_key(key)[0])
                 and not (tie and key == "lm_head.weight"))
    result.export_bytes = params * DTYPE_BYTES[dtype] + sum(p.stat().st_size for p in tokenizer_files)
    found.append(_check_disk(_export_root(run, options), result.export_bytes))
    return result


def _check_hf_config(hf_config: dict, hf_keys: set[str], *, moe: bool) -> checks.Finding:
    """Load the HF config with transformers and build its model on the meta device: the names it expects must
    be the ones the mapping produces (for MoE, transformers 5 fuses experts in memory: the architecture loads)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="molgen-preflight-") as folder:
        Path(folder, "config.json").write_text(json.dumps(hf_config))
        config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = set(model.state_dict())
    if config.tie_word_embeddings:
        names.discard("lm_head.weight")
    if not moe and names != hf_keys:
        missing, extra = sorted(names - hf_keys), sorted(hf_keys - names)
        return checks.Finding("hf_config", False, f"{type(model).__name__} expects {missing[:3]} which nothing "
                                                  f"fills; the mapping writes {extra[:3]} which it has no place for")
    return checks.Finding("hf_config", True, f"{type(model).__name__} from the exported config.json "
                                             f"({config.model_type}, {config.num_hidden_layers} layers, vocab "
                                             f"{config.vocab_size}, rope {_rope_type(config)})")


def _rope_type(config) -> str:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return str(rope.get("rope_type", "default")) if isinstance(rope, dict) else "default"


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _check_disk(root: Path | None, needed: int) -> checks.Finding:
    if root is None:
        return checks.Finding("disk", True, f"one export needs {_size(needed)}; export root unknown until the "
                                            "first checkpoint (pass --output to check it now)", warning=True)
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    ok = free >= needed
    warning = ok and free < DISK_HEADROOM * needed
    return checks.Finding("disk", ok, f"one export needs {_size(needed)}, {_size(free)} free under "
                                      f"{existing}" + (" (less than two exports' worth: replacing one needs both "
                                                       "for a moment)" if warning else ""), warning=warning)
