"""Quality of a compressed model: perplexity on held-out text and KL divergence from the base model.

Perplexity is computed over non-overlapping windows of ``seq_len`` tokens of one token stream (the
documents joined by EOS), each window scored on its ``seq_len - 1`` next-token predictions, in fp32.
The same windows give the mean per-token KL divergence KL(p_base || p_model) of the next-token
distributions: on a small model perplexity barely moves at 4 bits while the KL still separates good
methods from bad ones. Everything is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from compressor.calibration import load_texts, tokenize_stream
from compressor.model import resolve_model_path


@dataclass
class EvalResult:
    perplexity: float
    tokens: int
    windows: int
    base_perplexity: float | None = None
    kl_divergence: float | None = None

    @property
    def perplexity_gap(self) -> float | None:
        return None if self.base_perplexity is None else self.perplexity - self.base_perplexity

    def to_dict(self) -> dict:
        return {**self.__dict__, "perplexity_gap": self.perplexity_gap}

    def format(self, name: str, base_name: str | None = None) -> str:
        lines = [f"{name}: perplexity {self.perplexity:.4f} ({self.windows} windows, {self.tokens} predicted tokens)"]
        if self.base_perplexity is not None:
            gap = self.perplexity_gap
            lines.append(f"{base_name}: perplexity {self.base_perplexity:.4f}")
            lines.append(f"gap: {gap:+.4f} ({100 * gap / self.base_perplexity:+.2f}%), mean per-token KL: {self.kl_divergence:.5f} nats")
        return "\n".join(lines)


def load_causal_lm(model: str, dtype: torch.dtype = torch.float32, device="cpu"):
    """A model for evaluation: ``demo``, a folder (our exports included) or a hub id.

    Our compressed-tensors exports load through ``load_quantized_model``, so their weights stay
    quantized and run through our kernels (and asymmetric ones load, which transformers cannot yet).
    """
    from compressor.export import load_quantized_model

    path = resolve_model_path(model)
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None) is not None:
        loaded = load_quantized_model(path, dtype=dtype, device=device)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    loaded.eval()
    return loaded, AutoTokenizer.from_pretrained(path)


def heldout_stream(tokenizer, text: str = "demo") -> torch.Tensor:
    """The evaluation token stream: the demo's held-out split, or a local text/dataset source."""
    if text == "demo":
        from compressor.demo import demo_text_path

        return tokenize_stream(tokenizer, [demo_text_path("heldout").read_text()])
    return tokenize_stream(tokenizer, load_texts(text))


def make_windows(stream: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    count = stream.numel() // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"the evaluation text has {stream.numel()} tokens, fewer than seq_len={seq_len}")
    return stream[: count * seq_len].reshape(count, seq_len)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, base=None, batch_size: int = 4) -> EvalResult:
    """Perplexity of ``model`` on ``windows`` and, with ``base``, its perplexity and the KL from it."""
    device = next(model.parameters()).device
    nll = base_nll = kl = 0.0
    tokens = 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        targets = batch[:, 1:]
        log_probs = F.log_softmax(model(batch).logits[:, :-1].float(), dim=-1)
        nll += -log_probs.gather(-1, targets.unsqueeze(-1)).sum().item()
        if base is not None:
            base_log_probs = F.log_softmax(base(batch.to(next(base.parameters()).device)).logits[:, :-1].float().to(device), dim=-1)
            base_nll += -base_log_probs.gather(-1, targets.unsqueeze(-1)).sum().item()
            kl += (base_log_probs.exp() * (base_log_probs - log_probs)).sum().item()
        tokens += targets.numel()
    result = EvalResult(perplexity=math.exp(nll / tokens), tokens=tokens, windows=len(windows))
    if base is not None:
        result.base_perplexity = math.exp(base_nll / tokens)
        result.kl_divergence = kl / tokens
    return result


def evaluate_paths(model: str, base: str | None = None, text: str = "demo", seq_len: int = 512, max_windows: int | None = None, device="cpu") -> EvalResult:
    """``compressor eval``: load the model (and base), build the windows once, evaluate both."""
    loaded, tokenizer = load_causal_lm(model, device=device)
    windows = make_windows(heldout_stream(tokenizer, text), seq_len, max_windows)
    base_model = load_causal_lm(base, device=device)[0] if base is not None else None
    return evaluate(loaded, windows, base_model)


def run_lm_eval(model, tokenizer, tasks: list[str], batch_size: int = 8) -> dict:
    """lm-evaluation-harness tasks on an already loaded model (needs the ``eval`` extra)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ValueError("lm-eval tasks need the eval extra: pip install -e '.[eval]'") from None
    results = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), tasks=tasks)
    return results["results"]
