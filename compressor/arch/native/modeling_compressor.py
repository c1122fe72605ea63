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
    CohereConfig,
    CohereForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Glm4Config,
    Glm4ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    StableLmConfig,
    StableLmForCausalLM,
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


class CompressorGemma2Config(Gemma2Config):
    model_type = "compressor_gemma2"


class CompressorGemma2ForCausalLM(Gemma2ForCausalLM):
    config_class = CompressorGemma2Config


class CompressorGemma3TextConfig(Gemma3TextConfig):
    model_type = "compressor_gemma3_text"


class CompressorGemma3TextForCausalLM(Gemma3ForCausalLM):
    config_class = CompressorGemma3TextConfig


class CompressorPhi3Config(Phi3Config):
    model_type = "compressor_phi3"


class CompressorPhi3ForCausalLM(Phi3ForCausalLM):
    config_class = CompressorPhi3Config


class CompressorOlmo2Config(Olmo2Config):
    model_type = "compressor_olmo2"


class CompressorOlmo2ForCausalLM(Olmo2ForCausalLM):
    config_class = CompressorOlmo2Config


class CompressorGraniteConfig(GraniteConfig):
    model_type = "compressor_granite"


class CompressorGraniteForCausalLM(GraniteForCausalLM):
    config_class = CompressorGraniteConfig


class CompressorGlm4Config(Glm4Config):
    model_type = "compressor_glm4"


class CompressorGlm4ForCausalLM(Glm4ForCausalLM):
    config_class = CompressorGlm4Config


class CompressorCohereConfig(CohereConfig):
    model_type = "compressor_cohere"


class CompressorCohereForCausalLM(CohereForCausalLM):
    config_class = CompressorCohereConfig


class CompressorStableLmConfig(StableLmConfig):
    model_type = "compressor_stablelm"


class CompressorStableLmForCausalLM(StableLmForCausalLM):
    config_class = CompressorStableLmConfig


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
