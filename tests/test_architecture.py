"""The architecture channel: adapters name norm -> linear groups and the attention/KV modules; every
architecture an export declares is one row of ``arch/shipped.py``."""

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from compressor.arch import ADAPTERS, ExportArchitecture, adapter_for, norm_linear_groups
from compressor.arch.shipped import SHIPPED
from compressor.errors import UserError


def test_every_adapter_names_its_norm_groups_and_attention_modules(tiny_models):
    for adapter in ADAPTERS[:4]:  # the Llama family (the other families: tests/test_families.py)
        groups = norm_linear_groups(adapter)
        assert groups == {
            "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
        }
    for path in tiny_models.values():
        config = AutoConfig.from_pretrained(path)
        adapter = adapter_for(config)
        block = AutoModelForCausalLM.from_config(config).get_submodule(f"{adapter.blocks}.0")
        modules = dict(block.named_modules())
        assert {adapter.attention, adapter.mlp} <= modules.keys()
        assert all(path in modules for paths in norm_linear_groups(adapter).values() for path in paths)
        assert all(adapter.linears[role].startswith(adapter.attention + ".") for role in adapter.kv_cache)


def test_every_shipped_architecture_declares_its_files_auto_map_and_registration():
    """One shape for every architecture our exports declare: its files exist, its ``auto_map`` points into
    them, and ``import compressor`` registered its classes, so its exports load without remote code."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    for row in SHIPPED:
        sources = row.modeling_sources()
        assert set(sources) == set(row.modeling_files)
        assert all(
            f"class {name.rpartition('.')[2]}(" in sources[f"{name.partition('.')[0]}.py"]
            for classes in row.classes.values()
            for name in classes
        )
        for model_type in row.model_types:
            config_class = CONFIG_MAPPING[model_type]
            assert config_class.model_type == model_type
            if model_type in row.classes:
                assert row.auto_map(model_type)["AutoModelForCausalLM"].endswith(
                    MODEL_FOR_CAUSAL_LM_MAPPING[config_class].__name__
                )
                declared = ExportArchitecture.declared(config_class())
                assert declared.modeling_files == sources and declared.auto_map == row.auto_map(model_type)


def test_an_architecture_without_a_shipped_row_cannot_be_declared():
    config = AutoConfig.for_model("llama")
    config.model_type = "homemade_llama"
    with pytest.raises(ValueError, match="not a shipped architecture"):
        ExportArchitecture.declared(config)


def test_a_shipped_architecture_reads_through_its_base_adapter_and_only_some_compress_again(tmp_path):
    from compressor.model import ModelHandle

    assert adapter_for(AutoConfig.for_model("modegpt_qwen3")).family == "qwen3"
    assert adapter_for(AutoConfig.for_model("compressor_llama")).family == "llama"
    AutoConfig.for_model("llama_swiftkv", num_hidden_layers=2, num_key_value_layers=1).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="llama_swiftkv checkpoint .* cannot be compressed again"):
        ModelHandle.open(tmp_path)


def test_a_config_without_blocks_is_refused(tmp_path):
    from compressor.model import ModelHandle

    AutoConfig.for_model("llama", num_hidden_layers=0).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="num_hidden_layers 0: no blocks"):
        ModelHandle.open(tmp_path)
