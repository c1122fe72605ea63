"""The architectures our exports declare, in one shape: ``ShippedArchitecture`` rows in ``SHIPPED``.

A step that changes the architecture (TransMLA, SwiftKV, MoDeGPT) declares the new config, and the writer
gives native-format checkpoints their own (``native``); the row of that config's ``model_type`` says the
rest. Each row is one package beside this file:

* ``model_types``: the checkpoints' model types, each with the base family it was made from;
* ``modeling_files``: modeling code (files in the package) that the writer ships beside the weights, for
  architectures transformers has no class for, and ``classes``: per model type, the config and
  causal-LM classes in those files, which give both the config's ``auto_map`` (transformers loads the
  checkpoint with ``trust_remote_code=True`` in a process that never imported compressor) and the
  registration with ``AutoConfig`` / ``AutoModelForCausalLM`` that ``import compressor`` does
  (``transformers_hook.py``), so every export loads without remote code once compressor is imported;
* ``compressible``: whether a checkpoint of it can be compressed again (it is then read through its
  base family's adapter).

A new architecture is one package here and one row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ShippedArchitecture:
    package: str  # the package beside this file
    model_types: dict[str, str]  # model_type of its checkpoints -> the base family's model_type
    modeling_files: tuple[str, ...] = ()
    classes: dict[str, tuple[str, str]] = field(
        default_factory=dict
    )  # model_type -> ("file.Config", "file.ForCausalLM")
    compressible: bool = False

    def modeling_sources(self) -> dict[str, str]:
        """File name -> source of the modeling code an export ships."""
        return {name: (HERE / self.package / name).read_text() for name in self.modeling_files}

    def auto_map(self, model_type: str) -> dict[str, str]:
        if model_type not in self.classes:
            return {}
        config_class, model_class = self.classes[model_type]
        return {"AutoConfig": config_class, "AutoModelForCausalLM": model_class}

    def shipped_class(self, dotted: str):
        """A class named ``file.Class`` in one of the modeling files, imported from the package."""
        module, _, name = dotted.rpartition(".")
        return getattr(import_module(f"compressor.arch.{self.package}.{module}"), name)

    def model_type_for(self, family: str | None) -> str | None:
        """This architecture's model type for a base family (None: it has none)."""
        return next((t for t, base in self.model_types.items() if base == family), None)

    def config_from(self, base_config, **extra):
        """The config of this architecture made from a base family's ``base_config`` plus ``extra`` keys."""
        config_class, model_class = self.classes[self.model_type_for(base_config.model_type)]
        dropped = ("model_type", "auto_map", "architectures")
        values = {k: v for k, v in base_config.to_dict().items() if k not in dropped}
        config = self.shipped_class(config_class).from_dict({**values, **extra})
        config.architectures = [model_class.rpartition(".")[2]]
        return config

    def register_configs(self) -> None:
        from transformers import AutoConfig

        for model_type, (config_class, _) in self.classes.items():
            AutoConfig.register(model_type, self.shipped_class(config_class), exist_ok=True)

    def register_models(self) -> None:
        from transformers import AutoModelForCausalLM

        for config_class, model_class in self.classes.values():
            AutoModelForCausalLM.register(
                self.shipped_class(config_class), self.shipped_class(model_class), exist_ok=True
            )


SHIPPED = (
    ShippedArchitecture(  # TransMLA: a stock DeepSeek-V3 config, no code to ship (read as DeepSeek-V3: quantizable)
        package="deepseek_mla",
        model_types={"deepseek_v3": "deepseek_v3"},
        compressible=True,
    ),
    ShippedArchitecture(  # SwiftKV: the released Snowflake layout
        package="swiftkv",
        model_types={"llama_swiftkv": "llama", "qwen2_swiftkv": "qwen2"},
        modeling_files=("configuration_llama_swiftkv.py", "modeling_llama_swiftkv.py"),
        classes={
            "llama_swiftkv": (
                "configuration_llama_swiftkv.LlamaSwiftKVConfig",
                "modeling_llama_swiftkv.LlamaSwiftKVForCausalLM",
            ),
            "qwen2_swiftkv": (
                "configuration_llama_swiftkv.Qwen2SwiftKVConfig",
                "modeling_llama_swiftkv.Qwen2SwiftKVForCausalLM",
            ),
        },
    ),
    ShippedArchitecture(  # MoDeGPT's sliced layers: per-layer widths of the base family
        package="modegpt",
        model_types={
            "modegpt_llama": "llama",
            "modegpt_mistral": "mistral",
            "modegpt_qwen2": "qwen2",
            "modegpt_qwen3": "qwen3",
        },
        modeling_files=("modeling_modegpt.py",),
        classes={
            "modegpt_llama": ("modeling_modegpt.ModeGPTLlamaConfig", "modeling_modegpt.ModeGPTLlamaForCausalLM"),
            "modegpt_mistral": ("modeling_modegpt.ModeGPTMistralConfig", "modeling_modegpt.ModeGPTMistralForCausalLM"),
            "modegpt_qwen2": ("modeling_modegpt.ModeGPTQwen2Config", "modeling_modegpt.ModeGPTQwen2ForCausalLM"),
            "modegpt_qwen3": ("modeling_modegpt.ModeGPTQwen3Config", "modeling_modegpt.ModeGPTQwen3ForCausalLM"),
        },
        compressible=True,
    ),
    ShippedArchitecture(  # our native format: the stock family under its own model type, so it fails closed
        package="native",
        model_types={
            "compressor_llama": "llama",
            "compressor_mistral": "mistral",
            "compressor_qwen2": "qwen2",
            "compressor_qwen3": "qwen3",
            "compressor_deepseek_v3": "deepseek_v3",
            "compressor_gemma2": "gemma2",
            "compressor_gemma3_text": "gemma3_text",
            "compressor_phi3": "phi3",
            "compressor_olmo2": "olmo2",
            "compressor_granite": "granite",
            "compressor_glm4": "glm4",
            "compressor_cohere": "cohere",
            "compressor_stablelm": "stablelm",
            "compressor_mixtral": "mixtral",
            "compressor_qwen2_moe": "qwen2_moe",
            "compressor_qwen3_moe": "qwen3_moe",
        },
        modeling_files=("modeling_compressor.py",),
        classes={
            "compressor_llama": (
                "modeling_compressor.CompressorLlamaConfig",
                "modeling_compressor.CompressorLlamaForCausalLM",
            ),
            "compressor_mistral": (
                "modeling_compressor.CompressorMistralConfig",
                "modeling_compressor.CompressorMistralForCausalLM",
            ),
            "compressor_qwen2": (
                "modeling_compressor.CompressorQwen2Config",
                "modeling_compressor.CompressorQwen2ForCausalLM",
            ),
            "compressor_qwen3": (
                "modeling_compressor.CompressorQwen3Config",
                "modeling_compressor.CompressorQwen3ForCausalLM",
            ),
            "compressor_deepseek_v3": (
                "modeling_compressor.CompressorDeepseekV3Config",
                "modeling_compressor.CompressorDeepseekV3ForCausalLM",
            ),
            "compressor_gemma2": (
                "modeling_compressor.CompressorGemma2Config",
                "modeling_compressor.CompressorGemma2ForCausalLM",
            ),
            "compressor_gemma3_text": (
                "modeling_compressor.CompressorGemma3TextConfig",
                "modeling_compressor.CompressorGemma3TextForCausalLM",
            ),
            "compressor_phi3": (
                "modeling_compressor.CompressorPhi3Config",
                "modeling_compressor.CompressorPhi3ForCausalLM",
            ),
            "compressor_olmo2": (
                "modeling_compressor.CompressorOlmo2Config",
                "modeling_compressor.CompressorOlmo2ForCausalLM",
            ),
            "compressor_granite": (
                "modeling_compressor.CompressorGraniteConfig",
                "modeling_compressor.CompressorGraniteForCausalLM",
            ),
            "compressor_glm4": (
                "modeling_compressor.CompressorGlm4Config",
                "modeling_compressor.CompressorGlm4ForCausalLM",
            ),
            "compressor_cohere": (
                "modeling_compressor.CompressorCohereConfig",
                "modeling_compressor.CompressorCohereForCausalLM",
            ),
            "compressor_stablelm": (
                "modeling_compressor.CompressorStableLmConfig",
                "modeling_compressor.CompressorStableLmForCausalLM",
            ),
            "compressor_mixtral": (
                "modeling_compressor.CompressorMixtralConfig",
                "modeling_compressor.CompressorMixtralForCausalLM",
            ),
            "compressor_qwen2_moe": (
                "modeling_compressor.CompressorQwen2MoeConfig",
                "modeling_compressor.CompressorQwen2MoeForCausalLM",
            ),
            "compressor_qwen3_moe": (
                "modeling_compressor.CompressorQwen3MoeConfig",
                "modeling_compressor.CompressorQwen3MoeForCausalLM",
            ),
        },
    ),
)


def architecture(package: str) -> ShippedArchitecture:
    """The row of one package (``architecture("swiftkv")``)."""
    return next(row for row in SHIPPED if row.package == package)


def shipped_for(model_type: str | None) -> ShippedArchitecture | None:
    return next((architecture for architecture in SHIPPED if model_type in architecture.model_types), None)


def register_configs() -> None:
    """``AutoConfig`` learns every shipped model type (called by ``import compressor``'s hook)."""
    for architecture in SHIPPED:
        architecture.register_configs()


def register_models() -> None:
    """``AutoModelForCausalLM`` learns every shipped causal LM."""
    for architecture in SHIPPED:
        architecture.register_models()
