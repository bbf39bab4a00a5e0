"""hf.config_files: the exported config.json, loaded by transformers' own `AutoConfig`, states the checkpoint's
architecture (not the base template's), RoPE as trained, tying explicitly; generation_config.json and the
tokenizer files come from the base assets, and special-token ids agree with the tokenizer."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from molgen_export.demo import make_tokenizer, tiny_arch, tiny_moe_arch, write_base_assets
from molgen_export.errors import ConfigError
from molgen_export.hf import config_files
from molgen_export.mapping.keymap import expected_hf_keys


def _load(config: dict, tmp_path: Path):
    """Write config.json as the export does and load it back with transformers."""
    from transformers import AutoConfig

    folder = tmp_path / "exported"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return AutoConfig.from_pretrained(folder)


def _released_base(tmp_path: Path, arch) -> dict:
    """A base config.json as a released model's assets hold it: other dims than the run's, its own extras."""
    write_base_assets(tmp_path, dataclasses.replace(arch, vocab_size=151936, dim=1024, n_layers=28, n_heads=16,
                                                    n_kv_heads=8, head_dim=128, hidden_dim=3072, rope_theta=10000.0,
                                                    max_seq_len=40960), eos_id=151643)
    base = json.loads((tmp_path / "config.json").read_text())
    base.update({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
                 "transformers_version": "4.51.0", "_name_or_path": "Qwen/Qwen3-0.6B", "sliding_window": 4096})
    return base


@pytest.mark.parametrize("tie", [True, False])
def test_config_states_the_checkpoints_architecture(tmp_path, tie):
    arch = tiny_arch(vocab_size=384, tie=True)
    config = config_files.build_hf_config(_released_base(tmp_path, arch), arch, tie=tie, dtype="bfloat16")
    assert list(config) == sorted(config)
    assert "transformers_version" not in config and "_name_or_path" not in config
    loaded = _load(config, tmp_path)
    assert type(loaded).__name__ == "Qwen3Config"
    assert (loaded.vocab_size, loaded.hidden_size, loaded.intermediate_size, loaded.num_hidden_layers,
            loaded.num_attention_heads, loaded.num_key_value_heads, loaded.head_dim) == (384, 64, 160, 2, 4, 2, 32)
    assert loaded.rms_norm_eps == 1e-6
    assert loaded.tie_word_embeddings is tie  # written explicitly: Qwen3Config's default is False
    assert loaded.max_position_embeddings == 40960  # the larger of the run's and the base's
    assert loaded.dtype == torch.bfloat16
    # the base's extras survive; its token ids too
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.initializer_range) == (151643, 151643, 0.02)


def test_rope_is_the_trained_one_never_the_bases(tmp_path):
    arch = tiny_arch(vocab_size=384)
    config = config_files.build_hf_config(_released_base(tmp_path, arch), arch, tie=True, dtype="bfloat16")
    assert config["rope_theta"] == 1e6 and config["rope_scaling"] is None  # the base's YaRN is not carried over
    loaded = _load(config, tmp_path)
    assert loaded.rope_parameters["rope_theta"] == 1e6  # not transformers' 10000 fallback (MarinFold#184)
    assert loaded.rope_parameters["rope_type"] == "default"

    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128}
    scaled = dataclasses.replace(arch, rope_scaling=yarn)
    config = config_files.build_hf_config({}, scaled, tie=True, dtype="float32")
    loaded = _load(config, tmp_path)
    assert loaded.rope_parameters["rope_type"] == "yarn" and loaded.rope_parameters["factor"] == 2.0
    assert loaded.rope_parameters["rope_theta"] == 1e6


def test_hf_model_built_from_the_config_has_the_checkpoints_shapes(tmp_path):
    from transformers import AutoModelForCausalLM

    arch = tiny_arch(vocab_size=384)
    loaded = _load(config_files.build_hf_config({}, arch, tie=False, dtype="float32"), tmp_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(loaded)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(shapes) == expected_hf_keys(arch.n_layers, with_head=True)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (arch.n_heads * arch.head_dim, arch.dim)
    assert shapes["model.layers.0.self_attn.k_norm.weight"] == (arch.head_dim,)
    assert shapes["lm_head.weight"] == (384, 64)


def test_moe_config(tmp_path):
    from transformers import AutoModelForCausalLM

    arch = tiny_moe_arch(num_experts=12, top_k=2, moe_layers=(1,))
    loaded = _load(config_files.build_hf_config({}, arch, tie=False, dtype="bfloat16"), tmp_path)
    assert type(loaded).__name__ == "Qwen3MoeConfig"
    assert (loaded.num_experts, loaded.num_experts_per_tok, loaded.moe_intermediate_size, loaded.norm_topk_prob,
            loaded.mlp_only_layers) == (12, 2, 48, True, [0])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(loaded)
    assert type(model.model.layers[0].mlp).__name__ == "Qwen3MoeMLP"
    assert type(model.model.layers[1].mlp).__name__ == "Qwen3MoeSparseMoeBlock"


def test_moe_config_over_a_base_saved_by_transformers_5(tmp_path):
    """transformers 5 saves the expert count as `num_local_experts`: the base's must not override the run's
    (bug fixed: the exported config held both, and transformers read the base's 128 experts)."""
    from transformers import Qwen3MoeConfig

    arch = tiny_moe_arch(num_experts=12, top_k=2, moe_layers=(0, 1))
    Qwen3MoeConfig(num_experts=128, num_experts_per_tok=8).save_pretrained(tmp_path / "base")
    base = json.loads((tmp_path / "base" / "config.json").read_text())
    assert base["num_local_experts"] == 128
    loaded = _load(config_files.build_hf_config(base, arch, tie=False, dtype="bfloat16"), tmp_path)
    assert (loaded.num_experts, loaded.num_experts_per_tok) == (12, 2)


def test_generation_config_from_the_base_assets(tmp_path):
    from transformers import GenerationConfig

    arch = tiny_arch()
    write_base_assets(tmp_path, arch, eos_id=5)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 5, "do_sample": True, "temperature": 0.6, "transformers_version": "4.51.0"}))
    generation = config_files.build_generation_config(tmp_path, {"bos_token_id": 5, "eos_token_id": 9,
                                                                 "pad_token_id": None})
    assert generation == {"bos_token_id": 5, "do_sample": True, "eos_token_id": 5, "temperature": 0.6}
    assert GenerationConfig.from_dict(generation).temperature == 0.6


def test_generation_config_without_one_in_the_base(tmp_path):
    assert config_files.build_generation_config(tmp_path, {"bos_token_id": 1, "eos_token_id": 2}) == \
        {"bos_token_id": 1, "eos_token_id": 2}
    (tmp_path / "generation_config.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        config_files.build_generation_config(tmp_path, {})


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("assets")
    size = make_tokenizer(folder, vocab_size=300)
    write_base_assets(folder, tiny_arch(), eos_id=0)
    return folder, size


def test_tokenizer_files_are_the_allow_list(assets):
    folder, _ = assets
    names = [p.name for p in config_files.tokenizer_files(folder)]
    assert names == ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    assert set(names) <= set(config_files.TOKENIZER_FILES)  # config.json, README.md never


def test_tokenizer_link_out_of_the_assets_refused(assets, tmp_path):
    folder, _ = assets
    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink(folder / "tokenizer.json", linked / "tokenizer.json")
    with pytest.raises(ConfigError, match="points outside"):
        config_files.tokenizer_files(linked)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no tokenizer"):
        config_files.tokenizer_files(empty)


def test_tokenizer_size_and_special_ids(assets):
    from tokenizers import Tokenizer

    folder, size = assets
    assert config_files.tokenizer_size(folder) == size == Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    eos = Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id("<|endoftext|>")
    assert config_files.special_token_ids(folder) == {"bos_token_id": None, "eos_token_id": eos, "pad_token_id": eos}
    assert config_files.tokenizer_size(folder / "missing") is None


def test_special_tokens_reconciled_the_tokenizer_wins():
    hf_config = {"bos_token_id": 7, "eos_token_id": 9}
    generation = {"eos_token_id": [9, 0], "pad_token_id": 3}
    warnings = config_files.reconcile_special_tokens(hf_config, generation,
                                                     {"bos_token_id": None, "eos_token_id": 0, "pad_token_id": 0})
    assert hf_config == {"bos_token_id": 7, "eos_token_id": 0, "pad_token_id": 0}
    assert generation == {"eos_token_id": [9, 0], "pad_token_id": 0}  # a list already holding the id is kept
    assert warnings == ["config.json eos_token_id=9 disagrees with the tokenizer's 0; wrote 0",
                        "generation_config.json pad_token_id=3 disagrees with the tokenizer's 0; wrote 0"]


def test_dense_config_over_a_base_saved_by_transformers_5(tmp_path):
    """A base saved by transformers 5 states RoPE as `rope_parameters` and one `layer_types` entry per layer of
    the released model; the export's config still loads with the run's theta and its own layer count."""
    from transformers import Qwen3Config

    Qwen3Config(num_hidden_layers=28, rope_theta=10000.0, max_position_embeddings=512).save_pretrained(tmp_path / "b")
    base = json.loads((tmp_path / "b" / "config.json").read_text())
    assert base["rope_parameters"]["rope_theta"] == 10000.0 and len(base["layer_types"]) == 28
    arch = tiny_arch(vocab_size=384)
    loaded = _load(config_files.build_hf_config(base, arch, tie=True, dtype="bfloat16"), tmp_path)
    assert loaded.rope_parameters["rope_theta"] == 1e6
    assert loaded.num_hidden_layers == 2 and loaded.layer_types == ["full_attention", "full_attention"]
    assert loaded.max_position_embeddings == 512 and loaded.head_dim == 32
