"""verify.checks: each check on real tensors, passing and failing; a failure names the tensor (both names) and what
was expected, and `raise_on_failures` raises once with every failed finding."""

from __future__ import annotations

import json

import pytest
import torch

from molgen_export.errors import VerificationError
from molgen_export.mapping.keymap import expected_hf_keys
from molgen_export.verify import checks


def test_key_coverage_exact():
    expected = expected_hf_keys(2, with_head=False)
    finding = checks.check_key_coverage(set(expected), expected)
    assert finding.ok and finding.name == "key_coverage" and f"{len(expected)} HF tensors" in finding.detail


def test_key_coverage_names_missing_and_extra():
    expected = expected_hf_keys(2, with_head=False)
    produced = (expected - {"model.layers.1.self_attn.k_norm.weight"}) | {"lm_head.weight"}
    finding = checks.check_key_coverage(produced, expected)
    assert not finding.ok
    assert "nothing fills: model.layers.1.self_attn.k_norm.weight" in finding.detail
    assert "no HF parameter: lm_head.weight" in finding.detail


def test_key_coverage_long_lists_are_cut_with_an_ellipsis():
    expected = expected_hf_keys(4, with_head=True)
    finding = checks.check_key_coverage(set(), expected)
    assert not finding.ok and finding.detail.endswith(" ...")
    listed = finding.detail.removeprefix("HF parameters nothing fills: ").removesuffix(" ...").split(", ")
    assert listed == sorted(expected)[:8]  # the first 8 in order, not all 47


def test_embedding_shapes():
    good = {"tok_embeddings.weight": (384, 64), "lm_head.weight": (384, 64), "norm.weight": (64,)}
    finding = checks.check_embedding_shapes(good, 384, 64)
    assert finding.ok and "embedding and head are [384, 64]" in finding.detail
    bad = {**good, "lm_head.weight": (320, 64)}
    finding = checks.check_embedding_shapes(bad, 384, 64)
    assert not finding.ok
    assert finding.detail == "`lm_head.weight` is [320, 64], expected [384, 64]"
    assert checks.check_embedding_shapes({"tok_embeddings.weight": (384, 32)}, 384, 64).ok is False


def test_vocab_padding_rows_are_legitimate_and_counted():
    finding = checks.check_vocab_padding(384, 300)
    assert finding.ok and not finding.warning
    assert "84 padded rows" in finding.detail
    assert checks.check_vocab_padding(300, 300).detail == "300 embedding rows = tokenizer size"


def test_vocab_padding_tokenizer_larger_than_embedding_fails():
    finding = checks.check_vocab_padding(320, 330)
    assert not finding.ok
    assert "330 tokens" in finding.detail and "320 rows" in finding.detail and "ids 320..329" in finding.detail


def test_vocab_padding_unknown_tokenizer_is_a_warning():
    finding = checks.check_vocab_padding(320, None)
    assert finding.ok and finding.warning


def test_tied_weights_equal_head_is_dropped():
    embedding = torch.randn(384, 64, dtype=torch.bfloat16)
    finding, tie = checks.check_tied_weights(embedding, embedding.clone(), run_says_tied=True)
    assert tie and finding.ok and not finding.warning and "bit for bit" in finding.detail
    finding, tie = checks.check_tied_weights(embedding, None, run_says_tied=False)
    assert tie and finding.ok and "no head tensor" in finding.detail


def test_tied_weights_a_head_that_drifted_is_exported_untied_with_a_warning():
    """pytorch/torchtitan#2252: the run config says tied, training untied them; the tensors decide."""
    embedding = torch.randn(384, 64)
    head = embedding.clone()
    head[7, 3] += 0.25
    finding, tie = checks.check_tied_weights(embedding, head, run_says_tied=True)
    assert not tie and finding.ok and finding.warning
    assert "0.25" in finding.detail and "tie_word_embeddings=false" in finding.detail
    # one ulp is a difference too: bit for bit, not allclose
    head = embedding.clone()
    head[0, 0] = torch.nextafter(head[0, 0], torch.tensor(float("inf")))
    assert checks.check_tied_weights(embedding, head, run_says_tied=True)[1] is False


def test_tied_weights_untied_run():
    embedding, head = torch.randn(384, 64), torch.randn(384, 64)
    finding, tie = checks.check_tied_weights(embedding, head, run_says_tied=False)
    assert not tie and finding.ok and not finding.warning and "untied run" in finding.detail
    # a head of another shape cannot be tied, and comparing it does not crash
    finding, tie = checks.check_tied_weights(embedding, torch.randn(320, 64), run_says_tied=True)
    assert not tie and finding.warning and "nan" in finding.detail


def test_nonfinite_screen_and_count_on_real_tensors():
    clean = torch.randn(64, 64, dtype=torch.bfloat16)
    assert not checks.any_nonfinite(clean) and checks.count_nonfinite(clean) == (0, 0)
    dirty = clean.clone()
    dirty[3, 5] = float("nan")
    dirty[10, 0] = float("inf")
    dirty[11, 1] = float("-inf")
    assert checks.any_nonfinite(dirty)
    assert checks.count_nonfinite(dirty) == (1, 2)
    only_nan = torch.zeros(5)
    only_nan[4] = float("nan")
    assert checks.any_nonfinite(only_nan) and checks.count_nonfinite(only_nan) == (1, 0)


def test_nonfinite_screen_false_alarm_is_cleared_by_the_count():
    # every value finite, but the fp16 sum overflows: the screen may say yes, the count says no
    big = torch.full((8,), 60000.0, dtype=torch.float16)
    assert torch.isfinite(big).all()
    assert checks.any_nonfinite(big)
    assert checks.count_nonfinite(big) == (0, 0)


def test_nonfinite_ignores_integer_and_empty_tensors():
    assert not checks.any_nonfinite(torch.arange(10))
    assert checks.count_nonfinite(torch.arange(10)) == (0, 0)
    assert not checks.any_nonfinite(torch.empty(0, 64))


def test_nonfinite_finding_names_the_tensor_on_both_sides():
    tensors = {("layers.1.attention.wo.weight", "model.layers.1.self_attn.o_proj.weight"): torch.randn(16, 16),
               ("norm.weight", "model.norm.weight"): torch.ones(16)}
    tensors[("layers.1.attention.wo.weight", "model.layers.1.self_attn.o_proj.weight")][2, 2] = float("nan")
    bad = [(ck, hk, *checks.count_nonfinite(t)) for (ck, hk), t in tensors.items() if checks.any_nonfinite(t)]
    finding = checks.nonfinite_finding(bad, total=len(tensors))
    assert not finding.ok
    assert finding.detail == "`layers.1.attention.wo.weight` (HF `model.layers.1.self_attn.o_proj.weight`): 1 NaN, 0 Inf"
    assert checks.nonfinite_finding([], total=2).detail == "2 tensors scanned, no NaN or Inf"
    many = [(f"k{i}", f"h{i}", 1, 0) for i in range(12)]
    detail = checks.nonfinite_finding(many, total=12).detail
    assert detail.endswith(" ...") and "`k9`" in detail and "`k10`" not in detail


def test_raise_on_failures_collects_every_failed_finding():
    findings = [checks.check_vocab_padding(320, 330),
                checks.check_embedding_shapes({"lm_head.weight": (320, 32)}, 320, 64),
                checks.check_vocab_padding(384, 300)]
    with pytest.raises(VerificationError) as info:
        checks.raise_on_failures(findings, "step-20")
    error = info.value
    assert [f.name for f in error.findings] == ["vocab_padding", "embedding_shapes"]
    message = str(error)
    assert message.startswith("step-20 failed 2 check(s); nothing was published")
    assert "lm_head.weight" in message and "ids 320..329" in message
    assert error.hint and error.exit_code == 1
    checks.raise_on_failures([findings[2]], "step-20")  # all passed: no exception


def test_expert_bias():
    assert checks.check_expert_bias({}, allow_drop=False).ok
    zero = {"layers.1.moe.expert_bias_E": torch.zeros(12)}
    finding = checks.check_expert_bias(zero, allow_drop=False)
    assert finding.ok and "all zero" in finding.detail
    steered = {"layers.1.moe.expert_bias_E": torch.zeros(12), "layers.2.moe.expert_bias_E": torch.zeros(12)}
    steered["layers.2.moe.expert_bias_E"][5] = -0.5
    refused = checks.check_expert_bias(steered, allow_drop=False)
    assert not refused.ok and "max|bias| 0.5" in refused.detail and "--allow-expert-bias-drop" in refused.detail
    dropped = checks.check_expert_bias(steered, allow_drop=True)
    assert dropped.ok and dropped.warning


def test_finding_to_json_round_trips():
    finding = checks.check_vocab_padding(384, 300)
    assert checks.Finding(**json.loads(json.dumps(finding.to_json()))) == finding


def test_tie_check_piece_by_piece_decides_as_the_whole_tensor():
    embedding = torch.randn(96, 16, dtype=torch.bfloat16)
    head = embedding.clone()
    head[40, 1] += 0.25
    head[90, 2] += 0.5
    whole, whole_tie = checks.check_tied_weights(embedding, head, run_says_tied=True)
    check = checks.TieCheck(run_says_tied=True)
    results = [check.add(embedding[i:i + 32], head[i:i + 32]) for i in range(0, 96, 32)]
    assert results == [True, False, False]  # equal so far, then not
    assert check.wants_more  # a tied run measures the difference over every piece
    assert check.finding() == (whole, whole_tie)
    assert not whole_tie and check.max_diff == pytest.approx(0.5, abs=0.01)  # the largest, not the first

    untied = checks.TieCheck(run_says_tied=False)
    untied.add(embedding[:48], head[:48])
    assert not untied.wants_more  # nothing further can change an untied run's outcome
    assert untied.finding() == checks.check_tied_weights(embedding, head, run_says_tied=False)

    equal = checks.TieCheck(run_says_tied=True)
    assert all(equal.add(embedding[i:i + 10], embedding.clone()[i:i + 10]) for i in range(0, 96, 10))
    assert equal.finding()[1] is True


def test_tie_is_decided_bit_for_bit():
    embedding = torch.randn(8, 4)
    embedding[2, 2] = float("nan")
    # a tied head holds the very same bits, NaN included: tied (torch.equal would call these different)
    assert not torch.equal(embedding, embedding.clone())
    assert checks.bitwise_equal(embedding, embedding.clone())
    assert checks.check_tied_weights(embedding, embedding.clone(), run_says_tied=True)[1] is True
    zeros = torch.zeros(4)
    assert torch.equal(zeros, -zeros) and not checks.bitwise_equal(zeros, -zeros)  # -0.0 is another value's bits
    assert not checks.bitwise_equal(zeros, zeros.double())
    assert checks.bitwise_equal(torch.arange(6).reshape(2, 3).t(), torch.arange(6).reshape(2, 3).t().contiguous())
    transposed = embedding.t()  # a strided view compares by its values' bits, like its contiguous copy
    assert checks.bitwise_equal(transposed, transposed.contiguous())
    assert checks.max_abs_diff(torch.ones(3), torch.zeros(3)) == 1.0
