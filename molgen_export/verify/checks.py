"""Checks on what is about to be exported: each returns a Finding; any failed finding stops the export."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from molgen_export.errors import VerificationError


@dataclass(frozen=True)
class Finding:
    """The outcome of one check."""

    name: str
    ok: bool
    detail: str
    warning: bool = False
    """True for a passed check that still deserves the user's attention (e.g. an untied 'tied' run)."""

    def to_json(self) -> dict:
        return asdict(self)


def check_key_coverage(produced_hf_keys: set[str], expected_hf_keys: set[str]) -> Finding:
    """Every HF parameter filled, nothing extra."""
    missing = sorted(expected_hf_keys - produced_hf_keys)
    extra = sorted(produced_hf_keys - expected_hf_keys)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"HF parameters nothing fills: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if extra:
            parts.append(f"tensors with no HF parameter: {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
        return Finding("key_coverage", False, "; ".join(parts))
    return Finding("key_coverage", True, f"{len(expected_hf_keys)} HF tensors, each filled exactly once")


def check_embedding_shapes(shapes: dict[str, tuple[int, ...]], vocab_size: int, dim: int) -> Finding:
    """Embedding (and head, when present) are `[vocab_size, dim]` as the architecture says."""
    bad = [f"`{key}` is {list(shape)}, expected {[vocab_size, dim]}"
           for key, shape in shapes.items() if key in ("tok_embeddings.weight", "lm_head.weight")
           and tuple(shape) != (vocab_size, dim)]
    if bad:
        return Finding("embedding_shapes", False, "; ".join(bad))
    return Finding("embedding_shapes", True, f"embedding{' and head' if 'lm_head.weight' in shapes else ''} "
                                             f"are [{vocab_size}, {dim}]")


def check_vocab_padding(embedding_rows: int, tokenizer_size: int | None) -> Finding:
    """Tokenizer fits in the embedding; padded rows are legitimate and recorded."""
    if tokenizer_size is None:
        return Finding("vocab_padding", True, "no tokenizer size known; not checked", warning=True)
    if tokenizer_size > embedding_rows:
        return Finding("vocab_padding", False,
                       f"the tokenizer has {tokenizer_size} tokens but the embedding only {embedding_rows} rows: "
                       f"ids {embedding_rows}..{tokenizer_size - 1} would index past it")
    padding = embedding_rows - tokenizer_size
    return Finding("vocab_padding", True,
                   f"{embedding_rows} embedding rows, {tokenizer_size} tokenizer tokens, {padding} padded rows "
                   "never produced by the tokenizer" if padding else
                   f"{embedding_rows} embedding rows = tokenizer size")


def check_tied_weights(embedding: torch.Tensor, head: torch.Tensor | None, run_says_tied: bool) -> tuple[Finding, bool]:
    """Decide whether the export ties the head, from the tensors rather than from the config.

    Returns:
        The finding and whether to write the model tied.
    """
    if head is None:
        return tied_weights_finding(has_head=False, equal=True, max_diff=None, run_says_tied=run_says_tied)
    equal = embedding.shape == head.shape and torch.equal(embedding, head)
    diff = None
    if not equal and run_says_tied:
        diff = (embedding.float() - head.float()).abs().max().item() if embedding.shape == head.shape else float("nan")
    return tied_weights_finding(has_head=True, equal=equal, max_diff=diff, run_says_tied=run_says_tied)


def tied_weights_finding(*, has_head: bool, equal: bool, max_diff: float | None,
                         run_says_tied: bool) -> tuple[Finding, bool]:
    """The tied-weights decision once the head and the embedding were compared (whole, or piece by piece).

    Args:
        has_head: the checkpoint stores a head tensor.
        equal: the head equals the embedding bit for bit.
        max_diff: max|head - embedding| when they differ and the run claims tying (for the warning).
        run_says_tied: what the run config claims.

    Returns:
        The finding and whether to write the model tied.
    """
    if not has_head:
        return Finding("tied_weights", True, "checkpoint has no head tensor; exported tied to the embedding"), True
    if equal:
        return Finding("tied_weights", True, "head equals the embedding bit for bit; written tied, head dropped"), True
    if run_says_tied:
        diff = float("nan") if max_diff is None else max_diff
        return Finding(
            "tied_weights", True,
            f"the run config ties the head to the embedding, but the checkpoint's head differs (max|Δ| {diff:.3g}): "
            "training untied them (TorchTitan 0.2.1 ties on the meta device and to_empty() unties, "
            "pytorch/torchtitan#2252), so the model that was trained is untied; exported untied "
            "(lm_head written, tie_word_embeddings=false)", warning=True), False
    return Finding("tied_weights", True, "untied run: head written separately"), False


def any_nonfinite(tensor: torch.Tensor) -> bool:
    """Fast screen for NaN/Inf: one reduction (a NaN or Inf anywhere makes the sum non-finite).

    A True may be a false alarm (a sum overflowing); count with `count_nonfinite` to be sure.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return False
    return not bool(torch.isfinite(tensor.sum()))


def count_nonfinite(tensor: torch.Tensor) -> tuple[int, int]:
    """(NaN count, Inf count) of a floating tensor."""
    if not tensor.is_floating_point():
        return 0, 0
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    return nan, inf


def nonfinite_finding(bad: list[tuple[str, str, int, int]], total: int) -> Finding:
    """Summarize the NaN/Inf scan: `bad` holds (checkpoint key, hf key, nan, inf) for each bad tensor."""
    if bad:
        detail = "; ".join(f"`{ck}` (HF `{hk}`): {nan} NaN, {inf} Inf" for ck, hk, nan, inf in bad[:10])
        return Finding("finite_values", False, detail + (" ..." if len(bad) > 10 else ""))
    return Finding("finite_values", True, f"{total} tensors scanned, no NaN or Inf")


def raise_on_failures(findings: list[Finding], step_label: str) -> None:
    """Raise one VerificationError listing every failed finding, if any failed."""
    failed = [f for f in findings if not f.ok]
    if failed:
        lines = "\n".join(f"  - {f.name}: {f.detail}" for f in failed)
        raise VerificationError(f"{step_label} failed {len(failed)} check(s); nothing was published:\n{lines}",
                                findings=failed,
                                hint="fix the run (or its config) and export again; see export_report.json fields")


def check_expert_bias(biases: dict[str, torch.Tensor], allow_drop: bool) -> Finding:
    """TorchTitan's load-balancing `expert_bias_E` steers routing; HF Qwen3-MoE has no place for it.

    A zero bias changes nothing and is dropped. A non-zero one means routing after export differs from routing
    in training: refused unless `allow_drop`, then recorded as a warning.
    """
    if not biases:
        return Finding("expert_bias", True, "no expert-bias buffers")
    largest = max(float(t.abs().max()) if t.numel() else 0.0 for t in biases.values())
    if largest == 0.0:
        return Finding("expert_bias", True, f"{len(biases)} expert-bias buffers, all zero; dropped")
    detail = (f"{len(biases)} expert-bias buffers, max|bias| {largest:.3g}: HF Qwen3-MoE routes without them, "
              "so routing after export differs from routing in training")
    if allow_drop:
        return Finding("expert_bias", True, detail + "; dropped on request (--allow-expert-bias-drop)", warning=True)
    return Finding("expert_bias", False, detail + "; pass --allow-expert-bias-drop to export anyway")
