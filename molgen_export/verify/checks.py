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


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN payloads included), unlike `torch.equal` on floats."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    bits = _BITS.get(a.dtype.itemsize)
    if bits is None or not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(a.view(bits), b.view(bits))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| in float32; NaN when the shapes differ."""
    if a.shape != b.shape:
        return float("nan")
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


class TieCheck:
    """The tie check: is the stored head the embedding, bit for bit? Fed piece by piece (the same rows of both),
    so it runs inside a stream with flat memory; `check_tied_weights` is the whole-tensor form.

    The export's streamer (compares while it writes), the distributed export's rank 0 (`weight_stream.decide_tie`)
    and the HF import (`convert.hf_qwen3.decide_tie`) all decide with it.

    Args:
        run_says_tied: what the run config claims; when it claims tying and the tensors differ, the largest
            difference is measured over every piece (for the warning).
    """

    def __init__(self, run_says_tied: bool):
        self.run_says_tied = run_says_tied
        self.equal = True
        """Every piece so far was equal."""
        self.max_diff: float | None = None
        """max|head - embedding| over the pieces compared since they differed (run config tied only)."""

    @property
    def wants_more(self) -> bool:
        """Whether further pieces can change the outcome (they are equal so far, or a difference is measured)."""
        return self.equal or self.run_says_tied

    def add(self, embedding_rows: torch.Tensor, head_rows: torch.Tensor) -> bool:
        """Compare one piece of both tensors; True when this piece is equal and all before it were."""
        same = self.equal and bitwise_equal(embedding_rows, head_rows)
        if not same:
            self.equal = False
            if self.run_says_tied:
                diff = max_abs_diff(embedding_rows, head_rows)
                self.max_diff = diff if self.max_diff is None else max(self.max_diff, diff)
        return same

    def finding(self, *, has_head: bool = True) -> tuple[Finding, bool]:
        """The finding and whether to write the model tied (see `tied_weights_finding`)."""
        return tied_weights_finding(has_head=has_head, equal=self.equal or not has_head,
                                    max_diff=None if self.equal else self.max_diff, run_says_tied=self.run_says_tied)


def check_tied_weights(embedding: torch.Tensor, head: torch.Tensor | None, run_says_tied: bool) -> tuple[Finding, bool]:
    """Decide whether the export ties the head, from the tensors rather than from the config (`TieCheck` on the
    whole tensors).

    Returns:
        The finding and whether to write the model tied.
    """
    check = TieCheck(run_says_tied)
    if head is None:
        return check.finding(has_head=False)
    check.add(embedding, head)
    return check.finding()


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


def nonfinite_in(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(NaN count, Inf count) of a tensor that holds any, else None: the one-reduction screen, then the exact
    count only when it fires (the streams' hot path)."""
    if not any_nonfinite(tensor):
        return None
    counts = count_nonfinite(tensor)
    return counts if any(counts) else None


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
