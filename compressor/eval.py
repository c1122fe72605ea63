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

from compressor import kvcache
from compressor.calibration import load_texts, tokenize_stream
from compressor.errors import UserError
from compressor.model import ModelLoadError, checkpoint_dtype, resolve_model_path, safetensors_index, transformers_says
from compressor.progress import Progress


@dataclass
class EvalResult:
    perplexity: float
    tokens: int
    windows: int
    base_perplexity: float | None = None
    kl_divergence: float | None = None
    kv_cache: dict | None = None  # the quantized KV cache the model ran with (spec and bytes per token), if any

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
            lines.append(
                f"gap: {gap:+.4f} ({100 * gap / self.base_perplexity:+.2f}%), mean per-token KL: "
                f"{self.kl_divergence:.5f} nats"
            )
        if self.kv_cache is not None:
            lines.append(f"KV cache: {kvcache.describe(self.kv_cache)}")
        return "\n".join(lines)


def evaluation_dtype(config, device) -> torch.dtype:
    """The checkpoint's own dtype on a GPU (an 8B bf16 base takes 16 GB, not 32); fp32 on the CPU, as
    the session computes there (CPU half-precision matmuls are slow, and the recorded numbers are fp32)."""
    return checkpoint_dtype(config) if torch.device(device).type == "cuda" else torch.float32


def load_causal_lm(model: str, dtype: torch.dtype | None = None, device="cpu", trust_remote_code: bool = False):
    """A model for evaluation: ``demo``, a folder (our exports included) or a hub id, in ``dtype``
    (default: ``evaluation_dtype``). ``trust_remote_code``: allow a model's own code (an ``auto_map``
    our shipped architectures do not cover).

    Our compressed-tensors exports load through ``load_quantized_model``, so their weights stay
    quantized and run through our kernels (and asymmetric ones load, which transformers cannot yet).
    A damaged or incomplete checkpoint is a one-line ``ModelLoadError``.
    """
    from compressor.export import load_quantized_model

    path = resolve_model_path(model)
    with transformers_says(path):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        dtype = dtype or evaluation_dtype(config, device)
        safetensors_index(path)  # names a truncated or damaged shard before transformers reads it
        if getattr(config, "quantization_config", None) is not None:
            loaded = load_quantized_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        else:
            loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code).to(
                device
            )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    loaded.eval()
    return loaded, tokenizer


class StreamedModel:
    """An uncompressed model run block by block (``BlockwiseModel``), as model steps run it: in its
    checkpoint dtype on a GPU, its blocks kept in CPU memory and moved to the GPU one at a time when
    the weights would take more than 80 % of the free device memory; fp32 on the CPU. ``compressor
    eval`` reads the base model this way, so an 8B base costs 16 GB of GPU memory at most, not 32."""

    def __init__(self, model: str, device, trust_remote_code: bool = False):
        from compressor.blockwise import BlockwiseModel
        from compressor.model import ModelHandle

        device = torch.device(device)
        handle = ModelHandle.open(model, trust_remote_code=trust_remote_code)
        dtype = evaluation_dtype(handle.config, device)
        offloaded = not handle.fits_on(device, dtype)
        handle.materialize_all(device, dtype, block_device="cpu" if offloaded else None)
        self.runner = BlockwiseModel(handle, device, offloaded)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.runner.logits(batch)


def logits_of(model, batch: torch.Tensor) -> torch.Tensor:
    """fp32 logits of a transformers model or a ``StreamedModel``, on ``batch``'s device.

    A model with a quantized KV cache that leaves the prompt exact (``quantize_fresh: false``) reads
    each window as a prompt (its first half, attending to exact keys while the cache stores them
    quantized) and a continuation that attends to the cached prompt."""
    if isinstance(model, StreamedModel):
        return model.logits(batch).to(batch.device)
    batch_on_model = batch.to(next(model.parameters()).device)
    spec = kvcache.installed_spec(model)
    if spec is not None and not spec.quantize_fresh and batch.shape[1] > 1:
        half = batch.shape[1] // 2
        prompt = model(batch_on_model[:, :half])
        rest = model(batch_on_model[:, half:], cache=prompt.cache)
        return torch.cat([prompt.logits, rest.logits], dim=1).float().to(batch.device)
    return model(batch_on_model).logits.float().to(batch.device)


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
        raise UserError(f"the evaluation text has {stream.numel()} tokens, fewer than seq_len={seq_len}")
    return stream[: count * seq_len].reshape(count, seq_len)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, base=None, batch_size: int = 4, progress: bool = False) -> EvalResult:
    """Perplexity of ``model`` on ``windows`` and, with ``base``, its perplexity and the KL from it."""
    device = next(model.parameters()).device
    nll = base_nll = kl = 0.0
    tokens = 0
    with Progress(len(windows), "eval", "window", enabled=progress) as shown:
        for batch in windows.split(batch_size):
            nll_batch, base_nll_batch, kl_batch = score_batch(model, base, batch.to(device))
            nll, base_nll, kl = nll + nll_batch, base_nll + base_nll_batch, kl + kl_batch
            tokens += batch[:, 1:].numel()
            shown.update(
                len(batch), perplexity=math.exp(nll / tokens), **({"kl": kl / tokens} if base is not None else {})
            )
    result = EvalResult(perplexity=math.exp(nll / tokens), tokens=tokens, windows=len(windows))
    if base is not None:
        result.base_perplexity = math.exp(base_nll / tokens)
        result.kl_divergence = kl / tokens
    return result


def score_batch(model, base, batch: torch.Tensor) -> tuple[float, float, float]:
    """Summed next-token NLL of ``model`` (and of ``base``) on ``batch``, and the summed KL(base || model)."""
    targets = batch[:, 1:]
    log_probs = F.log_softmax(logits_of(model, batch)[:, :-1], dim=-1)
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).sum().item()
    if base is None:
        return nll, 0.0, 0.0
    base_log_probs = F.log_softmax(logits_of(base, batch)[:, :-1], dim=-1)
    base_nll = -base_log_probs.gather(-1, targets.unsqueeze(-1)).sum().item()
    kl = (base_log_probs.exp() * (base_log_probs - log_probs)).sum().item()
    return nll, base_nll, kl


def evaluate_paths(
    model: str,
    base: str | None = None,
    text: str = "demo",
    seq_len: int = 512,
    max_windows: int | None = None,
    device="cpu",
    progress: bool = False,
    kv_cache: bool = True,
    trust_remote_code: bool = False,
) -> EvalResult:
    """``compressor eval``: load the model (and base), build the windows once, evaluate both.

    An export that declares a quantized KV cache runs with it (and the result says its bytes per
    token); ``kv_cache=False`` runs it with an ordinary full-precision cache instead."""
    if base is not None:  # a damaged base fails before the model loads (load_causal_lm checks the model's own)
        safetensors_index(resolve_model_path(base))
    loaded, tokenizer = load_causal_lm(model, device=device, trust_remote_code=trust_remote_code)
    if not kv_cache:
        kvcache.remove(loaded)
    windows = make_windows(heldout_stream(tokenizer, text), seq_len, max_windows)
    base_model = base_for_kl(base, device, trust_remote_code) if base is not None else None
    result = evaluate(loaded, windows, base_model, progress=progress)
    result.kv_cache = kvcache.summary(loaded)
    return result


def base_for_kl(base: str, device, trust_remote_code: bool = False):
    """The base model, streamed block by block when it is an unquantized checkpoint we can open
    (``StreamedModel``); otherwise (a quantized base, an architecture without an adapter) loaded whole."""
    from compressor.arch import UnsupportedArchitecture

    try:
        return StreamedModel(base, device, trust_remote_code)
    except (UnsupportedArchitecture, ModelLoadError):
        return load_causal_lm(base, device=device, trust_remote_code=trust_remote_code)[0]


def run_lm_eval(model, tokenizer, tasks: list[str], batch_size: int = 8) -> dict:
    """lm-evaluation-harness tasks on an already loaded model (needs the ``eval`` extra)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise UserError("lm-eval tasks need the eval extra: pip install -e '.[eval]'") from None
    results = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), tasks=tasks
    )
    return results["results"]
