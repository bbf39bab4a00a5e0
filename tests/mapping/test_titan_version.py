"""The installed torchtitan is chosen at run time: 0.2.1 and 0.3.x work, anything else is refused with the fix."""

from __future__ import annotations

import pytest

from molgen_export.errors import ConfigError, DependencyError
from molgen_export.mapping import titan
from tests.helpers.titan_version import IS_TITAN021, TITAN


@pytest.fixture
def fake_version(monkeypatch):
    def install(version):
        monkeypatch.setattr(titan, "installed_version", lambda: version)
        titan.installed.cache_clear()

    yield install
    titan.installed.cache_clear()


@pytest.mark.parametrize("version", ["0.2.0", "0.1.0", "0.4.0", "1.0.0", "nightly"])
def test_unsupported_versions_are_refused_naming_version_and_fix(fake_version, version):
    fake_version(version)
    with pytest.raises(DependencyError) as info:
        titan.installed()
    message = str(info.value)
    assert f"torchtitan {version} is installed" in message and "0.2.1 or 0.3.x" in message
    assert 'pip install "torchtitan>=0.3,<0.4"' in message and "torchtitan==0.2.1" in message


def test_missing_torchtitan_is_refused(fake_version):
    fake_version(None)
    with pytest.raises(DependencyError, match="torchtitan is not installed"):
        titan.installed()


@pytest.mark.parametrize("version, kind", [("0.2.1", titan.Titan021), ("0.2.1+cu128", titan.Titan021),
                                           ("0.3.0", titan.Titan03), ("0.3.1.dev20260101", titan.Titan03)])
def test_supported_versions_choose_their_api(version, kind):
    assert titan.parse_version(version) >= titan.MIN_VERSION and isinstance(kind(version), titan.Titan)


def test_the_installed_version_is_the_one_in_use():
    expected = titan.Titan021 if titan.parse_version(titan.installed_version()) < (0, 3, 0) else titan.Titan03
    assert type(TITAN) is expected


def test_canonical_names_become_the_installed_models_own():
    keys = {"layers.0.attention.qkv_linear.wq.weight": "layers.0.attention.wq.weight",
            "lm_head.weight": "output.weight",
            "layers.1.moe.routed_experts.inner_experts.w2_EDF": "layers.1.moe.experts.w2",
            "layers.1.moe.expert_bias_E": "layers.1.moe.expert_bias", "norm.weight": "norm.weight"}
    for canonical, old in keys.items():
        assert titan.Titan021("0.2.1").native_key(canonical) == old
        assert titan.Titan03("0.3.0").native_key(canonical) == canonical


@pytest.mark.skipif(not IS_TITAN021, reason="torchtitan 0.2.1's Qwen3ModelArgs (installed: 0.3)")
def test_titan021_refuses_what_its_model_cannot_build_and_what_hf_cannot_express():
    import dataclasses

    from molgen_export.demo import tiny_moe_arch
    from molgen_export.verify.reference_titan021 import decide_args

    with pytest.raises(ConfigError, match="mixes dense and MoE layers") as info:
        tiny_moe_arch(moe_layers=(1,)).titan_model_config()
    assert "torchtitan>=0.3" in str(info.value)
    args = tiny_moe_arch(moe_layers=(0, 1)).titan_model_config()
    args = dataclasses.replace(args, moe_args=dataclasses.replace(args.moe_args, score_func="sigmoid",
                                                                  num_shared_experts=1))
    refused = {d.path for d in decide_args(args) if d.refused}
    assert refused == {"moe_args.score_func", "moe_args.num_shared_experts"}


@pytest.mark.parametrize("shape", ["dense", "dense-untied", "moe", "moe-mixed"])
def test_the_dry_runs_name_table_gives_the_adapters_names(shape):
    """The dry run maps names with `keymap.HF_NAME_TABLE` (no torchtitan import); the export asks the installed
    adapter. Both must give the same name for every key of a real torchtitan model's state dict."""
    from dataclasses import replace

    from molgen_export.demo import tiny_arch, tiny_moe_arch
    from molgen_export.mapping import keymap

    arch = {"dense": tiny_arch(n_layers=3), "dense-untied": tiny_arch(tie=False, n_layers=3),
            "moe": tiny_moe_arch(), "moe-mixed": tiny_moe_arch(moe_layers=(1,))}[shape]
    if shape == "moe-mixed" and IS_TITAN021:
        pytest.skip("torchtitan 0.2.1 builds no mixed dense/MoE layers")
    model = TITAN.meta_model(arch.titan_model_config(tie=False))
    state = TITAN.model_wrapper_class()(model).state_dict()
    shapes, _ = keymap.split_training_buffers({k: tuple(v.shape) for k, v in state.items()})
    sources, _ = keymap.canonicalize_keys(shapes, n_heads=arch.n_heads, n_kv_heads=arch.n_kv_heads,
                                          head_dim=arch.head_dim)
    by_adapter = keymap.map_to_hf(sources, replace(arch, tie_word_embeddings=False).titan_model_config())
    assert keymap.map_by_table(sources) == by_adapter
    assert len(by_adapter) == len(sources) and "lm_head.weight" in by_adapter.values()


def test_the_name_table_refuses_what_it_does_not_know():
    from molgen_export.errors import MappingError
    from molgen_export.mapping import keymap

    sources, _ = keymap.canonicalize_keys({"layers.0.attention.wq.bias": (4,), "norm.weight": (4,)})
    with pytest.raises(MappingError, match=r"1 checkpoint tensor\(s\) map to no HF Qwen3 parameter: "
                                           r"layers\.0\.attention\.wq\.bias"):
        keymap.map_by_table(sources)
