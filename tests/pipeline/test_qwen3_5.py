"""Qwen3.5 (torchtitan 0.3 `qwen3_5`, dense and MoE) -> HF text model: tiny real torchtitan models trained two steps
on CPU through the pure-torch delta rule, mapped with our map, written as an HF folder, loaded with
`AutoModelForCausalLM`, and compared logit for logit with torchtitan's own modules; the 0.3.0 adapter's expert
layout pinned and refused; a DCP save read back through `molgen_export.dcp.read`.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import pytest
import torch

from molgen_export.errors import ConfigError, MappingError
from molgen_export.mapping import qwen3_5 as qmap
from molgen_export.mapping.qwen3_5_config import hf_text_config

try:
    from molgen_export.verify import qwen3_5_reference as ref

    TITAN = ref.import_qwen3_5().package
except ImportError as exc:  # torchtitan before 0.3.0, or no torchtitan
    pytest.skip(f"no torchtitan qwen3_5 to test against: {exc}", allow_module_level=True)
pytest.importorskip("transformers.models.qwen3_5", reason="this transformers has no Qwen3_5ForCausalLM (5.x has)")

DIM, FFN, MOE_FFN, EXPERTS, VOCAB = 64, 96, 32, 4, 128
"""MOE_FFN = DIM / 2 makes the 0.3.0 adapter's gate_up_proj [E, D, 2F] the same shape as HF's [E, 2F, D], so its
wrong layout loads and must be caught by the logits, not only by a shape."""

RELATIVE_TOLERANCE = 1e-4
"""max|logit difference| allowed, relative to max|logit| (both sides compute in float32)."""


def _tiny_config(moe: bool, vocab: int = VOCAB):
    from torchtitan.models.common import Embedding, Linear

    rope = TITAN.MRoPE.Config(dim=8, max_seq_len=64, theta=10_000.0, mrope_section=[2, 1, 1])
    common = {"rope": rope, "attn_backend": "flex", "n_layers": 4, "dim": DIM, "n_heads": 4, "n_kv_heads": 2,
              "head_dim": 16, "rotary_dim": 8, "n_key_heads": 2, "n_value_heads": 4, "key_head_dim": 16,
              "value_head_dim": 8, "full_attention_interval": 2}  # linear, full, linear, full
    if moe:
        layers = TITAN._build_qwen35_moe_layers(moe_hidden_dim=MOE_FFN, num_experts=EXPERTS, top_k=2,
                                                shared_expert_hidden_dim=24, **common)
    else:
        layers = TITAN._build_qwen35_layers(hidden_dim=FFN, **common)
    return TITAN.Qwen35Model.Config(
        vocab_size=vocab, dim=DIM, norm=TITAN._offset_norm(DIM),
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=DIM, param_init=TITAN._EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=DIM, out_features=vocab, param_init=TITAN._output_linear_init(DIM)),
        layers=layers,
        vision_encoder=TITAN._qwen35_vision_encoder_config(dim=32, ffn_dim=32, num_layers=1, num_heads=2,
                                                           patch_size=2, temporal_patch_size=1, spatial_merge_size=1,
                                                           out_hidden_size=DIM, num_position_embeddings=4))


def _train_two_steps(config) -> dict[str, torch.Tensor]:
    """A tiny torchtitan qwen3_5 model, two AdamW steps of next-token loss on CPU; its state dict."""
    torch.manual_seed(0)
    model = ref.build_reference_model(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    vocab = config.vocab_size
    tokens = torch.randint(0, vocab, (1, 17))
    positions = torch.arange(16)[None]
    for _ in range(2):
        logits = model(tokens[:, :-1], positions=positions, attention_masks=None, special_tokens=ref._TEXT_ONLY)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@functools.cache
def _trained(kind: str):
    config = _tiny_config(kind == "moe")
    return kind, config, _train_two_steps(config)


@pytest.fixture(params=["dense", "moe"])
def run(request):
    kind, config, state = _trained(request.param)
    return kind, config, dict(state)


def _hf_config(config):
    from transformers import AutoConfig

    fields = hf_text_config(config)
    return AutoConfig.for_model(fields.pop("model_type"), **{k: v for k, v in fields.items() if k != "architectures"})


def _hf_model(config, hf_sd=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_hf_config(config), attn_implementation="sdpa").float().eval()
    if hf_sd is not None:
        model.load_state_dict(hf_sd, strict=True)
    return model


def _compare(titan_logits: torch.Tensor, hf_logits: torch.Tensor) -> tuple[float, float, float]:
    """max|Δ|, max|logit| (titan), top-1 agreement."""
    diff = (titan_logits - hf_logits).abs().max().item()
    return diff, titan_logits.abs().max().item(), (titan_logits.argmax(-1) == hf_logits.argmax(-1)).float().mean().item()


TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))


def test_plan_accounts_for_every_key_and_matches_the_hf_model(run):
    kind, config, state = run
    plan = qmap.plan_hf_text({k: tuple(v.shape) for k, v in state.items()}, text_only=True)
    hf_shapes = {k: tuple(v.shape) for k, v in _hf_model(config).state_dict().items()}
    assert {t.hf_key: t.shape for t in plan.tensors} == hf_shapes
    used = {k for t in plan.tensors for k in t.titan_keys}
    assert used.isdisjoint(plan.set_aside) and used | set(plan.set_aside) == set(state)
    assert any(k.startswith("vision_encoder.") for k in plan.set_aside)
    assert ("layers.0.moe.expert_bias_E" in plan.set_aside) is (kind == "moe")
    assert hf_text_config(config)["layer_types"] == ["linear_attention", "full_attention"] * 2

    with pytest.raises(MappingError, match=r"vision-tower .*vision_encoder\.") as caught:
        qmap.plan_hf_text({k: tuple(v.shape) for k, v in state.items()})
    assert "text-only" in caught.value.hint
    with pytest.raises(MappingError, match=r"layers\.0\.attn\.mystery\.weight"):
        qmap.plan_hf_text({"layers.0.attn.mystery.weight": (4, 4), "norm.weight": (4,)})
    with pytest.raises(MappingError, match=r"in_proj_qkv\.weight needs layers\.0\.attn\.in_proj_k\.weight"):
        qmap.plan_hf_text({"layers.0.attn.in_proj_q.weight": (4, 4), "layers.0.attn.in_proj_v.weight": (4, 4)})


def test_exported_folder_loads_with_automodel_and_matches_torchtitan_logits(run, tmp_path):
    """The HF folder (our tensors, our config.json) computes torchtitan's logits: `AutoModelForCausalLM` picks the
    class from config.json; torchtitan runs its own modules with the pure-torch delta rule."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    kind, config, state = run
    hf_sd, _ = qmap.to_hf_text(state, text_only=True)
    save_file(hf_sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_text_config(config)))
    hf_model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True, dtype=torch.float32,
                                                          attn_implementation="sdpa")
    assert type(hf_model).__name__ == ("Qwen3_5MoeForCausalLM" if kind == "moe" else "Qwen3_5ForCausalLM")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    titan_logits = ref.forward_logits(ref.build_reference_model(config, state), TOKENS)
    with torch.no_grad():
        hf_logits = hf_model.eval()(TOKENS).logits.float()
    diff, scale, top1 = _compare(titan_logits, hf_logits)
    assert diff <= RELATIVE_TOLERANCE * scale, f"{kind}: max|Δ| {diff:.3g} vs max|logit| {scale:.3g}"
    assert top1 == 1.0, f"{kind}: top-1 agreement {top1}"


def test_adapter_030_expert_layout_is_wrong_and_refused():
    """torchtitan 0.3.0's `Qwen35StateDictAdapter.to_hf` writes gate_up_proj [E, D, 2F] and down_proj [E, F, D];
    HF wants [E, 2F, D] and [E, D, F]. Its full output is refused at load; its gate_up_proj, which here has HF's
    shape, loads and fails the logit comparison. Every other tensor it writes agrees with ours."""
    _, config, state = _trained("moe")
    adapter_sd = TITAN.Qwen35StateDictAdapter(config, None).to_hf(dict(state))
    text = {("model." + k[len(qmap.ADAPTER_TEXT_PREFIX):] if k.startswith(qmap.ADAPTER_TEXT_PREFIX) else k): v
            for k, v in adapter_sd.items() if not k.startswith("model.visual.")}
    ours, _ = qmap.to_hf_text(state, text_only=True)
    assert set(text) == set(ours)
    gate_up, down = "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"
    assert tuple(text[gate_up].shape) == (EXPERTS, DIM, 2 * MOE_FFN)  # the pinned bad layout [E, D, 2F]
    assert tuple(text[down].shape) == (EXPERTS, MOE_FFN, DIM)  # [E, F, D]
    assert qmap.ADAPTER_030_EXPERT_LAYOUT["gate_up_proj"][1] == "[E, D, 2F]"
    assert tuple(ours[gate_up].shape) == (EXPERTS, 2 * MOE_FFN, DIM) and tuple(ours[down].shape) == (EXPERTS, DIM, MOE_FFN)
    for key, value in ours.items():
        if ".mlp.experts." not in key:
            assert torch.equal(text[key], value), key

    with pytest.raises(RuntimeError, match=r"size mismatch for model\.layers\.\d+\.mlp\.experts\.down_proj"):
        _hf_model(config, text)

    following_adapter = dict(ours)
    for key in ours:
        if key.endswith("gate_up_proj"):
            following_adapter[key] = text[key]
    titan_logits = ref.forward_logits(ref.build_reference_model(config, state), TOKENS)
    with torch.no_grad():
        hf_logits = _hf_model(config, following_adapter)(TOKENS).logits.float()
    diff, scale, top1 = _compare(titan_logits, hf_logits)
    assert diff > 100 * RELATIVE_TOLERANCE * scale and top1 < 1.0, (diff, scale, top1)


def test_dcp_save_reads_back_through_molgen_dcp_read(run, tmp_path):
    import torch.distributed.checkpoint as dcp

    from molgen_export.dcp.read import read_step_metadata

    kind, _, state = run
    step_dir = tmp_path / "step-2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({**state, "train_state": {"step": 2}}, checkpoint_id=str(step_dir))
    meta = read_step_metadata(step_dir)
    assert {k: tuple(e.shape) for k, e in meta.model.items()} == {k: tuple(v.shape) for k, v in state.items()}
    for key in ("layers.0.attn.conv_q.weight", "layers.0.attn.A_log", "layers.1.attn.wq.weight",
                "layers.1.moe.routed_experts.inner_experts.w2_EDF" if kind == "moe" else "layers.1.feed_forward.w2.weight"):
        assert torch.equal(meta.read(key), state[key]), key
    plan = qmap.plan_hf_text({k: tuple(e.shape) for k, e in meta.model.items()}, text_only=True)
    assert plan == qmap.plan_hf_text({k: tuple(v.shape) for k, v in state.items()}, text_only=True)


def test_hf_config_refuses_what_hf_cannot_express():
    config = _tiny_config(moe=True)
    config.layers[0].moe.router.score_func = "sigmoid"
    config.layers[2].attention_norm.eps = 1e-5
    with pytest.raises(ConfigError) as caught:
        hf_text_config(config)
    message = str(caught.value)
    assert "layers.0.moe.router: score_func='sigmoid'" in message and "layers.2.attention_norm.eps" in message
    dense = _tiny_config(moe=False)
    dense.layers[1].attention.wk.bias = True
    with pytest.raises(ConfigError, match=r"layers\.1\.attention\.wk\.bias = True"):
        hf_text_config(dense)


def test_recurrent_delta_rule_matches_transformers_chunked_and_restarts_per_document():
    """Ours (token by token) against transformers' chunked torch path, on inputs with the shapes torchtitan passes;
    with document offsets each document is the same as run alone."""
    from transformers.models.qwen3_5 import modeling_qwen3_5

    generator = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 70, 4, 16, generator=generator) for _ in range(2))
    v = torch.randn(1, 70, 4, 8, generator=generator)
    g = -torch.rand(1, 70, 4, generator=generator)
    beta = torch.rand(1, 70, 4, generator=generator)
    ours, _ = ref.recurrent_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    theirs, _ = modeling_qwen3_5.torch_chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)

    offsets = torch.tensor([0, 30, 70])
    split, _ = ref.recurrent_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, cu_seqlens=offsets)
    second, _ = ref.recurrent_gated_delta_rule(q[:, 30:], k[:, 30:], v[:, 30:], g[:, 30:], beta[:, 30:],
                                               use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(split[:, 30:], second)
    torch.testing.assert_close(split[:, :30], ours[:, :30])


def test_dcp_step_exports_and_passes_the_gate_and_the_adapter_layout_is_refused(run, tmp_path):
    """A DCP step read back through `dcp.read`, mapped, written, passes the Qwen3.5 logit gate (torchtitan's modules
    with the pure-torch delta rule against `AutoModelForCausalLM` on the folder); the same folder with the 0.3.0
    adapter's gate_up_proj layout is refused by that gate."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    from molgen_export.dcp.read import read_step_metadata
    from molgen_export.errors import VerificationError
    from molgen_export.verify import qwen3_5_gate

    kind, config, state = run
    step_dir = tmp_path / "step-2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(dict(state), checkpoint_id=str(step_dir))
    meta = read_step_metadata(step_dir)
    titan_sd = {key: meta.read(key) for key in meta.model}
    plan = qmap.plan_hf_text({k: tuple(e.shape) for k, e in meta.model.items()}, text_only=True)
    hf_sd = {entry.hf_key: qmap.build_hf_tensor(entry, titan_sd) for entry in plan.tensors}

    def write(folder, tensors):
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(hf_text_config(config)))
        return folder

    text_sd = {k: v for k, v in titan_sd.items() if not k.startswith("vision_encoder.")}  # the gate fills the tower
    fidelity = qwen3_5_gate.verify_qwen3_5_logits(config, text_sd, write(tmp_path / "hf", hf_sd),
                                                  vocab_limit=VOCAB, tolerance=RELATIVE_TOLERANCE)
    qwen3_5_gate.require_passed(fidelity, tmp_path / "hf")
    assert fidelity.result.top1_agreement == 1.0 and fidelity.delta_rule_op == ref.DELTA_RULE_OP
    assert fidelity.to_json()["tokens"] == 64
    if kind != "moe":
        return
    adapter_sd = TITAN.Qwen35StateDictAdapter(config, None).to_hf(dict(titan_sd))
    bad = {k: (adapter_sd[qmap.ADAPTER_TEXT_PREFIX + k[len("model."):]] if k.endswith("gate_up_proj") else v)
           for k, v in hf_sd.items()}
    refused = qwen3_5_gate.verify_qwen3_5_logits(config, text_sd, write(tmp_path / "hf-adapter", bad),
                                                 vocab_limit=VOCAB, tolerance=RELATIVE_TOLERANCE)
    assert not refused.passed and refused.result.top1_agreement < 1.0
    with pytest.raises(VerificationError, match=r"max\|Δ\| .* > .*top-1 agreement") as caught:
        qwen3_5_gate.require_passed(refused, tmp_path / "hf-adapter")
    assert "expert layout" in caught.value.hint


@pytest.mark.parametrize("flavor", ["tiny-dense", "tiny-moe", "debugmodel", "debugmodel_moe", "35B-A3B"])
def test_run_model_dict_rebuilds_the_config_field_for_field(flavor):
    """The run's `model_spec.model` (TorchTitan's `to_dict()` through JSON) gives back the same config, so the
    reference and the HF config are the run's own; a field the installed torchtitan lacks is refused by name."""
    from molgen_export.verify import reference

    config = (_tiny_config(flavor == "tiny-moe") if flavor.startswith("tiny")
              else TITAN.qwen3_5_configs[flavor](attn_backend="flex"))
    model = reference._render(config)
    rebuilt = ref.config_from_run_model(model, "job_config.json")
    differences: list[str] = []
    reference._diff(model, reference._render(rebuilt), "", differences)
    assert not differences
    assert hf_text_config(rebuilt) == hf_text_config(config)
    model["layers"][-1]["attention"]["mystery"] = 3
    with pytest.raises(ConfigError, match=r"model_spec\.model\.layers\.\d+\.attention\.mystery"):
        ref.config_from_run_model(model, "job_config.json")


def test_hf_config_of_registry_flavors_and_family_detection():
    dense = hf_text_config(TITAN.qwen3_5_configs["0.8B"](attn_backend="flex"))
    assert (dense["model_type"], dense["hidden_size"], dense["num_hidden_layers"], dense["intermediate_size"]) == \
        ("qwen3_5_text", 1024, 24, 3584)
    assert dense["layer_types"] == (["linear_attention"] * 3 + ["full_attention"]) * 6
    assert dense["rope_parameters"]["partial_rotary_factor"] == 0.25 and dense["linear_num_value_heads"] == 16
    moe = hf_text_config(TITAN.qwen3_5_configs["35B-A3B"](attn_backend="flex"))
    assert (moe["model_type"], moe["num_experts"], moe["num_experts_per_tok"], moe["moe_intermediate_size"],
            moe["shared_expert_intermediate_size"], moe["linear_num_value_heads"]) == \
        ("qwen3_5_moe_text", 256, 8, 512, 512, 32)
    assert qmap.is_qwen3_5("qwen3_6", []) and not qmap.is_qwen3_5("qwen3", ["layers.0.attn.A_log"])
    assert qmap.is_qwen3_5(None, ["model.layers.0._orig_mod.attn.in_proj_q.weight"])
    assert not qmap.is_qwen3_5(None, ["layers.0.attention.qkv_linear.wq.weight", "tok_embeddings.weight"])


def _qwen3_5_run(tmp_path, moe: bool, *, expert_bias: float = 0.0):
    """A qwen3_5 run folder: base assets with a tokenizer, `job_config.json` with the run's `model_spec`, and
    `checkpoint/step-2` saved with DCP (model and a train state) after two training steps."""
    import torch.distributed.checkpoint as dcp

    from molgen_export.demo import make_tokenizer
    from molgen_export.verify import reference

    assets = tmp_path / "assets"
    vocab = make_tokenizer(assets, vocab_size=300)
    config = _tiny_config(moe, vocab=vocab)
    state = _train_two_steps(config)
    for key in state:
        if key.endswith("expert_bias_E"):
            state[key] = torch.full_like(state[key], expert_bias)
    # a multimodal base config.json, as Qwen's Qwen3.5 folders have it: text fields under text_config
    (assets / "config.json").write_text(json.dumps({"model_type": "qwen3_5", "text_config": {
        "eos_token_id": 0, "bos_token_id": 0, "hidden_size": 4096, "num_hidden_layers": 4}}))
    step_dir = tmp_path / "run" / "checkpoint" / "step-2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({**state, "train_state": {"step": 2}}, checkpoint_id=str(step_dir))
    job = {"model_spec": {"name": "qwen3_5", "flavor": "tiny", "model": reference._render(config)},
           "hf_assets_path": str(assets), "dump_folder": str(tmp_path / "run"),
           "training": {"seq_len": 16, "dtype": "float32"}, "checkpoint": {"folder": "checkpoint"}}
    job_config = tmp_path / "run" / "job_config.json"
    job_config.write_text(json.dumps(job))
    return step_dir, job_config, config


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_export_step_of_a_qwen3_5_run_is_verified_and_published(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    from molgen_export.options import ExportOptions
    from molgen_export.pipeline.export import export_step

    step_dir, job_config, _ = _qwen3_5_run(tmp_path, kind == "moe")
    options = ExportOptions(config=job_config, output=tmp_path / "out", dtype="float32", drop_vision_tower=True)
    planned = export_step(step_dir, ExportOptions(**{**options.__dict__, "dry_run": True}))
    assert planned.status == "planned" and not (tmp_path / "out").exists()
    layer_types = next(f for f in planned.findings if f["name"] == "layer_types")
    assert layer_types["detail"].startswith("L F L F")

    report = export_step(step_dir, options)
    assert report.status == "exported" and report.written
    assert report.fidelity["passed"] and report.fidelity["top1_agreement"] == 1.0
    assert report.fidelity["mode"] == "whole"  # small models keep the whole-model gate
    assert report.fidelity["probe"]["passed"] and report.fidelity["probe"]["layers"] == [0, 1, 2, 3]
    assert report.fidelity["delta_rule_op"] == ref.DELTA_RULE_OP
    logits = next(f for f in report.findings if f["name"] == "logits")
    if kind == "moe":  # torchtitan's router and HF's gate chose the same experts for every token of every layer
        assert report.fidelity["routing_agreement"] == 1.0 and len(report.fidelity["routing"]) == 4
        assert all(layer["tokens"] == 64 for layer in report.fidelity["routing"])
        assert "same experts chosen for 1.0000 of tokens (worst MoE layer" in logits["detail"]
        assert report.fidelity["probe"]["routing_agreement"] >= 0.9
    else:
        assert report.fidelity["routing_agreement"] is None and "same experts" not in logits["detail"]
        assert report.fidelity["probe"]["routing_agreement"] is None
    assert any("vision-tower" in w for w in report.warnings)
    assert any("hidden_size: base 4096, run 64" in w for w in report.warnings)
    hf_dir = Path(report.output_dir)
    assert json.loads((hf_dir / "config.json").read_text())["eos_token_id"] == 0  # the base assets' token ids
    model, info = AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert type(model).__name__ == ("Qwen3_5MoeForCausalLM" if kind == "moe" else "Qwen3_5ForCausalLM")
    assert not any(info.values())
    assert json.loads((hf_dir / "export_report.json").read_text())["status"] == "exported"
    assert export_step(step_dir, options).status == "skipped"  # same source, options and assets
    forced = export_step(step_dir, ExportOptions(**{**options.__dict__, "force": True}))
    assert forced.status == "exported" and forced.replaced == ["--force"]


def test_cli_dcp_path_exports_a_qwen3_5_step(tmp_path, capsys):
    from molgen_export.cli import main

    step_dir, job_config, _ = _qwen3_5_run(tmp_path, moe=True)
    code = main(["--dcp-path", str(step_dir), "--config", str(job_config), "--output", str(tmp_path / "out"),
                 "--dtype", "bfloat16", "--drop-vision-tower"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "step-2" in out and "bf16" in out
    assert json.loads((tmp_path / "out" / "step-2-hf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_non_zero_expert_bias_is_refused_by_name(tmp_path):
    from molgen_export.errors import VerificationError
    from molgen_export.options import ExportOptions
    from molgen_export.pipeline.export import export_step

    step_dir, job_config, _ = _qwen3_5_run(tmp_path, moe=True, expert_bias=0.5)
    with pytest.raises(VerificationError, match=r"expert_bias"):
        export_step(step_dir, ExportOptions(config=job_config, output=tmp_path / "out", dtype="float32",
                                            drop_vision_tower=True))
    assert not (tmp_path / "out" / "step-2-hf").exists()


def test_a_vision_tower_is_refused_by_name_at_planning_unless_dropped(tmp_path):
    """TorchTitan's qwen3_5 always has a vision tower; the text export refuses it by name (dry run included, nothing
    written) and leaves it out, each key named, only when told to."""
    from molgen_export.options import ExportOptions
    from molgen_export.pipeline.export import export_step

    step_dir, job_config, _ = _qwen3_5_run(tmp_path, moe=False)
    options = ExportOptions(config=job_config, output=tmp_path / "out", dtype="float32")
    for dry_run in (True, False):
        with pytest.raises(MappingError, match=r"\d+ vision-tower tensor\(s\): vision_encoder\.") as caught:
            export_step(step_dir, ExportOptions(**{**options.__dict__, "dry_run": dry_run}))
        vision = caught.value.titan_keys
        assert len(vision) > qmap.VISION_KEYS_SHOWN and all(k.startswith("vision_encoder.") for k in vision)
        assert f"and {len(vision) - qmap.VISION_KEYS_SHOWN} more" in str(caught.value)
        assert "Qwen3_5ForConditionalGeneration" in str(caught.value) and "--drop-vision-tower" in caught.value.hint
        assert not (tmp_path / "out").exists()
    planned = export_step(step_dir, ExportOptions(**{**options.__dict__, "dry_run": True, "drop_vision_tower": True}))
    set_aside = next(f for f in planned.findings if f["name"] == "set_aside")["detail"]
    assert planned.status == "planned" and all(k in set_aside for k in vision)


def test_distributed_export_of_a_qwen3_5_run_is_refused_with_the_fix(tmp_path):
    from molgen_export.options import ExportOptions
    from molgen_export.pipeline.distributed import export_step_distributed

    step_dir, job_config, _ = _qwen3_5_run(tmp_path, moe=False)
    with pytest.raises(ConfigError, match="qwen3_5 run") as caught:
        export_step_distributed(step_dir, ExportOptions(config=job_config, output=tmp_path / "out"))
    assert "without --distributed" in caught.value.hint


@pytest.mark.parametrize("flavor", ["0.8B", "27B", "35B-A3B", "397B-A17B"])
def test_registry_flavors_map_onto_the_hf_model_their_config_gives(flavor):
    """At real sizes (on the meta device): every TorchTitan tensor of the flavor lands on an HF tensor of the
    shape transformers gives the exported config, and nothing of the HF model is left unfilled."""
    from molgen_export.pipeline.qwen3_5_export import _expected_hf_shapes

    config = TITAN.qwen3_5_configs[flavor](attn_backend="flex")
    with torch.device("meta"):
        titan_shapes = {k: tuple(v.shape) for k, v in config.build().state_dict().items()}
    plan = qmap.plan_hf_text(titan_shapes, text_only=True)
    assert {t.hf_key: t.shape for t in plan.tensors} == _expected_hf_shapes(hf_text_config(config))


def test_a_run_config_that_does_not_fit_the_checkpoint_is_refused(tmp_path):
    """The run's config (here: a dense model) against the checkpoint's shapes (an MoE one): refused before
    anything is written, the failed findings named."""
    from molgen_export.errors import VerificationError
    from molgen_export.options import ExportOptions
    from molgen_export.pipeline.export import export_step
    from molgen_export.verify import reference

    step_dir, job_config, config = _qwen3_5_run(tmp_path, moe=True)
    job = json.loads(job_config.read_text())
    job["model_spec"]["model"] = reference._render(_tiny_config(False, vocab=config.vocab_size))
    job_config.write_text(json.dumps(job))
    with pytest.raises(VerificationError) as caught:
        export_step(step_dir, ExportOptions(config=job_config, output=tmp_path / "out", dtype="float32",
                                            drop_vision_tower=True))
    failed = {f.name for f in caught.value.findings if not f.ok}
    assert "key_coverage" in failed and not (tmp_path / "out").exists()
