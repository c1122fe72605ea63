"""Shipped with every checkpoint in compressor's native format (``quant_method: "compressor"``).

Such a checkpoint declares ``model_type: compressor_<family>`` so that nothing loads it without our
quantizer: plain transformers refuses an unknown model type, and with ``trust_remote_code=True`` this file
imports compressor (which registers the quantizer) or says to install it. The classes are the stock
family's under new names; ``import compressor`` registers the same classes, so after it the checkpoint
loads without remote code. It imports only torch, transformers and compressor.
"""

try:
    import compressor  # noqa: F401  (registers quant_method "compressor" with transformers)
except ImportError as error:
    raise ImportError(
        "this checkpoint is in compressor's native format (quant_method 'compressor'): its quantized layers need "
        "compressor's kernels; pip install compressor, then load it as before"
    ) from error

from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)


class CompressorLlamaConfig(LlamaConfig):
    model_type = "compressor_llama"


class CompressorLlamaForCausalLM(LlamaForCausalLM):
    config_class = CompressorLlamaConfig


class CompressorMistralConfig(MistralConfig):
    model_type = "compressor_mistral"


class CompressorMistralForCausalLM(MistralForCausalLM):
    config_class = CompressorMistralConfig


class CompressorQwen2Config(Qwen2Config):
    model_type = "compressor_qwen2"


class CompressorQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = CompressorQwen2Config


class CompressorQwen3Config(Qwen3Config):
    model_type = "compressor_qwen3"


class CompressorQwen3ForCausalLM(Qwen3ForCausalLM):
    config_class = CompressorQwen3Config


class CompressorDeepseekV3Config(DeepseekV3Config):
    model_type = "compressor_deepseek_v3"


class CompressorDeepseekV3ForCausalLM(DeepseekV3ForCausalLM):
    config_class = CompressorDeepseekV3Config


class CompressorMixtralConfig(MixtralConfig):
    model_type = "compressor_mixtral"


class CompressorMixtralForCausalLM(MixtralForCausalLM):
    config_class = CompressorMixtralConfig


class CompressorQwen2MoeConfig(Qwen2MoeConfig):
    model_type = "compressor_qwen2_moe"


class CompressorQwen2MoeForCausalLM(Qwen2MoeForCausalLM):
    config_class = CompressorQwen2MoeConfig


class CompressorQwen3MoeConfig(Qwen3MoeConfig):
    model_type = "compressor_qwen3_moe"


class CompressorQwen3MoeForCausalLM(Qwen3MoeForCausalLM):
    config_class = CompressorQwen3MoeConfig
