"""The architecture channel: adapters name norm -> linear groups and the attention/KV modules; a step
that changes the architecture declares the export's config and modeling code through its context."""

from dataclasses import dataclass

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from compressor import Recipe, apply
from compressor.arch import ADAPTERS, adapter_for, norm_linear_groups
from compressor.export import load_quantized_model
from compressor.step import Step

MODELING = '''
from transformers import LlamaConfig, LlamaForCausalLM


class ShippedConfig(LlamaConfig):
    model_type = "shipped_llama"


class ShippedForCausalLM(LlamaForCausalLM):
    config_class = ShippedConfig
'''


def test_every_adapter_names_its_norm_groups_and_attention_modules(tiny_models):
    for adapter in ADAPTERS:
        groups = norm_linear_groups(adapter)
        assert groups == {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                          "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
    for path in tiny_models.values():
        config = AutoConfig.from_pretrained(path)
        adapter = adapter_for(config)
        block = AutoModelForCausalLM.from_config(config).get_submodule(f"{adapter.blocks}.0")
        modules = dict(block.named_modules())
        assert {adapter.attention, adapter.mlp} <= modules.keys()
        assert all(path in modules for paths in norm_linear_groups(adapter).values() for path in paths)
        assert all(adapter.linears[role].startswith(adapter.attention + ".") for role in adapter.kv_cache)


def test_a_declared_architecture_ships_its_modeling_code_with_auto_map(tiny_llama, registered, tmp_path):
    @registered("declare_shipped")
    @dataclass
    class DeclareShipped(Step):
        """Test step: changes nothing but declares the export as a ShippedForCausalLM."""

        needs_calibration = False

        def compress_block(self, context):
            shipped = {}
            exec(MODELING, shipped)  # the class the export will ship, as its step would import it
            config = shipped["ShippedConfig"](**{k: v for k, v in context.config.to_dict().items() if k != "model_type"})
            config.architectures = ["ShippedForCausalLM"]
            context.declare_architecture(
                config,
                {"modeling_shipped.py": MODELING},
                {"AutoConfig": "modeling_shipped.ShippedConfig", "AutoModelForCausalLM": "modeling_shipped.ShippedForCausalLM"},
            )

    out = tmp_path / "shipped"
    apply(Recipe.from_dict({"steps": ["declare_shipped"], "export": {"dtype": "float32"}}), tiny_llama, out, progress=False)
    assert (out / "modeling_shipped.py").read_text() == MODELING
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out)
    shipped = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(shipped).__name__ == "ShippedForCausalLM"
    ids = torch.randint(0, shipped.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    original = AutoModelForCausalLM.from_pretrained(tiny_llama)
    torch.testing.assert_close(shipped(ids).logits, original(ids).logits)
    assert type(load_quantized_model(out, trust_remote_code=True)).__name__ == "ShippedForCausalLM"
