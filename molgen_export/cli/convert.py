"""The other conversions' commands: `import-hf`, `export-titan`, `to-jax` and `from-nanogpt`.

Each command's flags shared with the DCP export (dtype, shard size, the logit check) are ExportOptions' own
(`flags.add_option_flags`); a default that is a conversion's own is read from its function's signature.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

from molgen_export.cli import flags
from molgen_export.options import EXPORT_DTYPES, ExportOptions
from molgen_export.pipeline.summary import summary_line


def _default(function, name: str):
    """The default of `function`'s parameter `name`: a conversion's own default, said once, in its signature."""
    return inspect.signature(function).parameters[name].default


# --- import-hf ------------------------------------------------------------------------------------------------------

IMPORT_HF_EPILOG = """\
examples:
  molgen-export import-hf Qwen/Qwen3-0.6B-local titan-init --format dcp
      -> a DCP checkpoint; start TorchTitan from it with checkpoint.initial_load_path=/abs/path/titan-init
  molgen-export import-hf hf-model titan-weights                 (TorchTitan-named model.safetensors)
  molgen-export import-hf hf-model titan-weights --dtype bfloat16 --force

The TorchTitan model built from the written files is compared with the HF model on fixed tokens (float32);
--skip-logits turns that off. Exit codes: 0 written and verified, 1 a check or the logit comparison failed,
2 bad input or config.
"""


def add_import_hf_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `molgen-export import-hf`."""
    from molgen_export.convert.hf_titan import FORMATS, import_hf

    parser.add_argument("hf_dir", type=Path, metavar="HF_DIR", help="HF Qwen3 folder (safetensors or .bin)")
    parser.add_argument("output_dir", type=Path, metavar="OUT_DIR", help="folder to create")
    parser.add_argument("--format", choices=FORMATS, default=_default(import_hf, "fmt"),
                        help="safetensors (TorchTitan names) or dcp (loadable as checkpoint.initial_load_path)")
    flags.add_option_flags(parser, ExportOptions, ("dtype", "max_shard_size", "skip_logits", "logits_atol", "force"),
                           help={"dtype": "cast floating tensors (default: keep stored dtypes)",
                                 "force": "replace OUT_DIR if it exists"})
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    flags.add_verbosity(parser)


def run_import_hf(args: argparse.Namespace) -> int:
    """`molgen-export import-hf`: HF Qwen3 folder -> TorchTitan weights, one line (or JSON) when done."""
    from molgen_export.convert.hf_titan import import_hf

    report = import_hf(args.hf_dir, args.output_dir, fmt=args.format, dtype=args.dtype, verify=not args.skip_logits,
                       logits_atol=args.logits_atol, max_shard_size=args.max_shard_size, force=args.force)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        logits = f"logits max|Δ| {report.fidelity['max_abs_diff']:.2g}" if report.fidelity else "logits skipped"
        print(f"{report.source_dir}  ok  {report.titan_tensors} TorchTitan tensors ({report.format}, "
              f"{','.join(report.dtypes)}, {'tied' if report.tied else 'untied'})  {logits}  "
              f"{report.timings.get('total', 0):.1f} s  -> {report.output_dir}")
    return flags.EXIT_OK


# --- export-titan ---------------------------------------------------------------------------------------------------

EXPORT_TITAN_EPILOG = """\
examples:
  molgen-export export-titan titan-weights --output hf-out --hf-assets Qwen3-0.6B-assets
  molgen-export export-titan titan-weights --output hf-out --config outputs/job_config.json --dtype bfloat16
  molgen-export export-titan titan-weights --output hf-out --hf-assets assets --dry-run

TITAN_DIR holds TorchTitan-named safetensors (model.safetensors, or shards with an index). The export runs the
DCP pipeline's checks, writes the HF folder and compares TorchTitan and HF logits before publishing.
"""


def add_export_titan_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `molgen-export export-titan`."""
    parser.add_argument("titan_dir", type=Path, metavar="TITAN_DIR", help="folder of TorchTitan-named safetensors")
    flags.add_option_flags(parser, ExportOptions, ("output", "hf_assets", "config"), required=("output",),
                           help={"output": "the HF folder to create",
                                 "hf_assets": "HF assets: Qwen3 config.json and tokenizer",
                                 "config": "the run's job_config.json (instead of deriving from --hf-assets)"})
    flags.add_write_and_verify_options(parser, help={"dtype": "export dtype (default: the stored dtype)"})
    flags.add_option_flags(parser, ExportOptions, ("dry_run", "force"),
                           help={"dry_run": "plan and check from headers only; write nothing",
                                 "force": "replace --output if it exists"})
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    flags.add_verbosity(parser)


def run_export_titan(args: argparse.Namespace) -> int:
    """`molgen-export export-titan`: TorchTitan-named safetensors -> verified HF folder; 1 when a check failed."""
    from molgen_export.convert.hf_titan import export_titan

    options = flags.options_from_args(args)
    report = export_titan(args.titan_dir, args.output, options)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(summary_line(report))
        if options.dry_run:
            for finding in report.findings:
                print(f"  check {finding['name']:<14} {'ok' if finding['ok'] else 'FAILED'}  {finding['detail']}")
    return flags.EXIT_OK if report.ok else flags.EXIT_FAILED


# --- to-jax ---------------------------------------------------------------------------------------------------------

TO_JAX_EPILOG = """\
examples:
  molgen-export to-jax hf-model jax-arrays                     (float32, loads with plain NumPy)
  molgen-export to-jax hf-model jax-arrays --dtype bfloat16    (needs ml_dtypes to load; JAX has it)

  python -c "from molgen_export.convert.jax_arrays import load_layer; print(load_layer('jax-arrays', 0).keys())"

Output: layer_00000.safetensors ... (one per decoder layer), embeddings.safetensors, manifest.json.
"""


def add_to_jax_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `molgen-export to-jax`."""
    from molgen_export.convert.jax_arrays import DTYPES, write_jax_arrays

    default_dtype = _default(write_jax_arrays, "dtype")
    parser.add_argument("hf_dir", type=Path, metavar="HF_DIR", help="HF Qwen3 folder (safetensors or .bin)")
    parser.add_argument("output_dir", type=Path, metavar="OUT", help="folder to create")
    parser.add_argument("--dtype", choices=DTYPES, default=default_dtype, help=f"array dtype (default {default_dtype})")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    flags.add_verbosity(parser)


def run_to_jax(args: argparse.Namespace) -> int:
    """`molgen-export to-jax`: HF Qwen3 folder -> per-layer arrays, one line (or JSON) when done."""
    from molgen_export.convert.jax_arrays import TOP_FILE, write_jax_arrays

    report = write_jax_arrays(args.hf_dir, args.output_dir, dtype=args.dtype, force=args.force)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(f"{report.source_dir}  ok  {report.n_layers} layer files + {TOP_FILE}, {report.arrays} arrays "
              f"({report.dtype}, {report.output_bytes / 1e6:.2f} MB, {'tied' if report.tied else 'untied'})  "
              f"{report.timings.get('total', 0):.1f} s  -> {report.output_dir}")
    return flags.EXIT_OK


# --- from-nanogpt ---------------------------------------------------------------------------------------------------

FROM_NANOGPT_EPILOG = """\
examples:
  molgen-export from-nanogpt out/ckpt.pt --output gpt2-hf
  molgen-export from-nanogpt out/ckpt.pt --output gpt2-hf --dtype bfloat16 --vocab-size 50257 --tokenizer gpt2-tok

--vocab-size N keeps the first N embedding rows (nanoGPT pads GPT-2's 50257 to 50304). --tokenizer DIR copies the
tokenizer files found there (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json, ...). The converted
folder is loaded with transformers and its logits compared with nanoGPT's forward pass before it is published.
"""


def add_from_nanogpt_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `molgen-export from-nanogpt`."""
    from molgen_export.convert.nanogpt import convert_nanogpt

    default_dtype = _default(convert_nanogpt, "dtype")
    parser.add_argument("checkpoint", type=Path, metavar="CKPT.pt", help="nanoGPT checkpoint (ckpt.pt)")
    parser.add_argument("--output", type=Path, required=True, help="the HF folder to create")
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, default=default_dtype,
                        help=f"weights dtype (default {default_dtype})")
    parser.add_argument("--vocab-size", type=int, help="keep the first N embedding rows (e.g. 50257)")
    parser.add_argument("--tokenizer", type=Path, help="folder with the GPT-2 tokenizer files to copy")
    flags.add_option_flags(parser, ExportOptions, ("skip_logits", "logits_atol", "force"),
                           help={"skip_logits": "skip the nanoGPT-vs-HF logit comparison",
                                 "logits_atol": "accepted max|logit difference| between nanoGPT's forward pass and the "
                                                "HF model, relative to max|logit|",
                                 "force": "replace --output if it exists"})
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    flags.add_verbosity(parser)


def run_from_nanogpt(args: argparse.Namespace) -> int:
    """`molgen-export from-nanogpt`: nanoGPT `.pt` -> verified HF GPT-2 folder, one line (or JSON) when done."""
    from molgen_export.convert.nanogpt import convert_nanogpt

    report = convert_nanogpt(args.checkpoint, args.output, dtype=args.dtype, vocab_size=args.vocab_size,
                             tokenizer_dir=args.tokenizer, verify=not args.skip_logits, logits_atol=args.logits_atol,
                             force=args.force)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        logits = f"logits max|Δ| {report.fidelity['max_abs_diff']:.2g}" if report.fidelity else "logits skipped"
        print(f"{report.source}  ok  {report.tensors} tensors ({report.dtype}, {'tied' if report.tied else 'untied'})"
              f"  {logits}  {report.timings.get('total', 0):.1f} s  -> {report.output_dir}")
        for warning in report.warnings:
            print(f"  warning: {warning}")
    return flags.EXIT_OK
