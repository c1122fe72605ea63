"""Random-weight models of each supported architecture, for tests and benchmarks (no download).

``make_random_model("qwen3", folder, hidden_size=64, ...)`` writes a transformers checkpoint
(config, safetensors, a small byte-level BPE tokenizer) built from a config alone.
``WholeModelContext`` stands in for a model step's context on a small model held whole in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

ARCHITECTURES = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},  # q/k/v projections carry biases
    "qwen3": {"head_dim": 32},  # set explicitly, as Qwen3 configs do  # per-head q/k RMSNorm
}

# Every other family with an adapter (and a few read through the generic one, arch/generic.py): a tiny config
# of each (hidden 64), its special token ids inside the 320-token vocabulary, and whatever makes the family's
# own features show at 16 tokens (sliding windows of 8, multipliers other than 1, partial rotary).
SMALL = dict(hidden_size=64, intermediate_size=128, pad_token_id=0, bos_token_id=0, eos_token_id=0)
FAMILIES = {
    "gemma2": {
        **SMALL,
        "head_dim": 16,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
        "tie_word_embeddings": True,  # as Gemma checkpoints do
    },
    "gemma3_text": {
        **SMALL,
        "head_dim": 16,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
        "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True,
    },
    "phi3": SMALL,
    "olmo2": SMALL,
    "granite": {
        **SMALL,
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.2,
        "logits_scaling": 4.0,
    },
    "glm4": {**SMALL, "head_dim": 16},
    "cohere": {**SMALL, "logit_scale": 0.5},
    "stablelm": SMALL,
    # no hand-written adapter: read through arch/generic.py
    "helium": {**SMALL, "head_dim": 16},
    "olmo3": {**SMALL, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    "phi": SMALL,  # refused by the generic adapter (dense / fc1 / fc2, attention and MLP in parallel)
}

# Mixture-of-experts families (compressor/moe.py): 4 experts (DeepSeek: 8 in 2 groups, a dense first layer)
# whose widths every group size divides
MOE_ARCHITECTURES = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 128, "sliding_window": None},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 128,
        "shared_expert_intermediate_size": 256,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "head_dim": 32},
    "deepseek_v3": {
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 128,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 2,
        "topk_group": 1,
        "q_lora_rank": None,
        "kv_lora_rank": 128,
        "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 32,
        "v_head_dim": 32,
        "num_key_value_heads": 4,
    },
}

TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. Compression keeps the model small and fast. Quantization rounds "
    "each weight to a grid; calibration text shows which weights matter. "
) * 20


def make_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([TOKENIZER_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def random_config(architecture: str, **overrides):
    settings = dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    (table,) = [table for table in (ARCHITECTURES, FAMILIES, MOE_ARCHITECTURES) if architecture in table]
    settings.update(table[architecture])
    settings.update(overrides)
    return AutoConfig.for_model(architecture, **settings)


def make_random_model(
    architecture: str,
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    fused_experts: bool = False,
    **overrides,
) -> Path:
    """A random-weight checkpoint of ``architecture`` (a key of ``ARCHITECTURES``, ``FAMILIES`` or
    ``MOE_ARCHITECTURES``) in ``folder``; ``fused_experts``: a MoE's experts stored as transformers 5 holds them
    (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]), not per expert."""
    folder = Path(folder)
    torch.manual_seed(seed)
    config = random_config(architecture, **overrides)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # spread the norms' weights so that folding or skipping them shows
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
        for name, buffer in model.named_buffers():  # DeepSeek-V3's routing bias: loaded, or routing changes
            if name.endswith("e_score_correction_bias"):
                buffer.uniform_(-0.05, 0.05)
    model.save_pretrained(folder, save_original_format=not fused_experts)
    make_tokenizer(config.vocab_size).save_pretrained(folder)
    return folder


def folder_digest(path: str | Path) -> dict[str, str]:
    """sha256 of every file below ``path``: proves a folder was left untouched."""
    import hashlib

    path = Path(path)
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


class WholeModelContext:
    """``ModelContext.forward_backward`` (next-token loss, gradients into every trainable tensor) on a
    model held whole in memory, for calling a model step's math without a session."""

    def __init__(self, model):
        self.model = model

    def forward_backward(self, input_ids, loss_fn=None):
        if loss_fn is not None:
            raise NotImplementedError("WholeModelContext computes the next-token loss only")
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        return loss.item()
