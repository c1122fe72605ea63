"""Rotate: random Hadamard rotations folded into the weights, so 4-bit activations lose their outliers.

Paper: Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024, arXiv
2404.00456 (official code spcl/QuaRot); SpinQuant (Liu et al., arXiv 2405.16406) learns the same
rotations. In a model with RMSNorms, an orthogonal ``Q`` applied to the residual stream changes nothing:
``RMSNorm(h Q) = RMSNorm(h) Q`` once the norms' gains are folded into the linears that read them. So:

* every norm gain goes into the columns of the linears reading it (q, k, v; gate, up; lm_head) and the
  gain becomes 1;
* the residual stream is rotated by ``Q = diag(random signs) kron(M, S_p)`` (``compressor.modules.hadamard``;
  a random orthogonal matrix where no Hadamard order fits): embeddings ``E Q``; linears that read the
  stream ``W Q``; linears that write it (o_proj, down_proj, their biases) ``Q^T W``;
* (``heads``) per attention head, V and o_proj's input are rotated by a Hadamard of head_dim:
  ``v_proj`` rows and ``o_proj`` columns, exact offline (QuaRot's offline half of its o_proj rotation);
* (``online_hadamard``) down_proj's input, the SwiGLU product, is rotated online by ``T``: the MLP
  becomes ``compressor.modules.hadamard.OnlineHadamardMLP`` and ``T`` folds into down_proj's columns.

The model's function is unchanged (exact up to float rounding: the test compares fp32 logits); what a
quantizer after it sees are weights and activations without outlier channels. It must come before
every quantizer (it rewrites the dense weights): ``rotate`` then ``rtn`` / ``gptq`` / ``qllm`` with
``activation_bits``. Tied embeddings are untied (the head gets the final norm's gain, the embedding
does not). The online Hadamard needs our native format and loaders (transformers after ``import
compressor``); with ``online_hadamard: false`` the rotated model is a stock one.

Defaults: QuaRot's (random Hadamard of the residual stream, online Hadamard before down_proj, offline
per-head rotation of V/O); QuaRot also rotates Q/K online for a 4-bit KV cache and o_proj's input across
heads online, which we leave out (our W4A4 quantizes Q/K/V per head and token, not a cache).
Measured (docs/methods/rotate.md, two trained Llamas): the online Hadamard carries the W4A4 gain (RTN's
KL 0.37x with it, 1.0x without); the per-head rotation is neutral within the spread of the random draw.

Learned residual rotation (``learned_steps`` > 0, SpinQuant's R1; default off): the random Hadamard is
the starting point, then Cayley SGD on the Stiefel manifold (SpinQuant Sec. 3.2, after Li et al., arXiv
2002.01113): with the Euclidean gradient ``G``, ``A = G R^T - R G^T`` (skew) and the Cayley transform
``R <- (I + lr/2 A)^{-1} (I - lr/2 A) R``, which stays orthogonal exactly (solved in fp64; the paper's
iterative approximation of the inverse is not needed at our sizes). SpinQuant minimises the network's
cross-entropy under W4A4 fake quantization with straight-through rounding; we minimise a layer-wise proxy
of it, which costs a few matrix products a step instead of a forward and backward of the whole model (our
CPU budget): for each norm of each block, on the calibration tokens' normalized residual stream ``X``
(captured once, before rotating) and the linears reading it (gains folded, ``W``), the relative output
error ``|Q_a(X R) Q_w(W R)^T - X W^T|^2 / |X W^T|^2`` with ``Q_a`` 4-bit per-token and ``Q_w`` 4-bit
per-channel asymmetric min-max (RTN W4A4's grids; ``learned_bits``), rounding straight-through and the
ranges differentiable, averaged over the norms. The linears writing the stream (o_proj, down_proj) and
lm_head (unquantized by default) are not in the proxy. Measured (rotate+RTN W4A4, 100 steps,
benchmarks/results/rotate/learned-summary-2026-12-05.md): KL 0.88-0.92x the random Hadamard's on the demo,
0.99x / 1.07x on the second model with a worse perplexity gap: it does not pay at this scale, so it stays off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from compressor.arch import attention_geometry, norm_linear_groups
from compressor.modules.activations import fake_quantize_tokens
from compressor.modules.hadamard import OnlineHadamardMLP, dense_hadamard, hadamard_factor
from compressor.step import Step, param, register_step

if TYPE_CHECKING:
    from compressor.context import ModelContext


def residual_rotation(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal [n, n] fp64 matrix: random signs times ``kron(M, S_p)``, or a Haar-random one
    (QR of a Gaussian) when ``n`` has no Hadamard factor (the block-diagonal fallback mixes too little)."""
    factor = hadamard_factor(n)
    if factor.shape[0] > 1 and bool((factor.abs() != 1).any()):  # an identity factor: no Hadamard of this order
        q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))
    signs = torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1
    return signs[:, None] * dense_hadamard(n, factor)


def cayley_step(rotation: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """One Cayley SGD step (fp64): ``(I + lr/2 A)^{-1} (I - lr/2 A) R`` with ``A = G R^T - R G^T``."""
    skew = grad @ rotation.t() - rotation @ grad.t()
    eye = torch.eye(rotation.shape[0], dtype=rotation.dtype)
    return torch.linalg.solve(eye + lr / 2 * skew, (eye - lr / 2 * skew) @ rotation)


def proxy_loss(rotation: torch.Tensor, groups: list[tuple[torch.Tensor, torch.Tensor]], bits: int) -> torch.Tensor:
    """Mean over ``groups`` (inputs X [T, n], weights W [N, n]) of W-and-A fake-quantized relative output error."""
    total = rotation.new_zeros(())
    for x, weight in groups:
        reference = x @ weight.t()
        out = fake_quantize_tokens(x @ rotation, bits) @ fake_quantize_tokens(weight @ rotation, bits).t()
        total = total + (out - reference).square().sum() / reference.square().sum()
    return total / len(groups)


def learn_rotation(
    rotation: torch.Tensor, groups: list, steps: int, lr: float, bits: int
) -> tuple[torch.Tensor, float, float]:
    """``steps`` Cayley SGD steps on ``proxy_loss`` from ``rotation`` (fp64): the rotation, first and last loss."""
    losses = []
    for _ in range(steps):
        current = rotation.float().requires_grad_(True)
        loss = proxy_loss(current, groups, bits)
        (grad,) = torch.autograd.grad(loss, current)
        losses.append(float(loss.detach()))
        rotation = cayley_step(rotation, grad.double(), lr)
    with torch.no_grad():
        final = float(proxy_loss(rotation.float(), groups, bits))
    return rotation, losses[0], final


def stream_groups(context: ModelContext, tokens: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per norm of each block: ``tokens`` random calibration positions of its RMS-normalized input (fp32, gain
    left out) and the stacked weights of the linears reading it with the gain folded in (the rotation's inputs)."""
    adapter = context.adapter
    captured: dict[str, list[torch.Tensor]] = {}
    hooks, groups = [], []
    for index, block in enumerate(context.blocks):
        for norm_path, readers in norm_linear_groups(adapter).items():
            norm = block.get_submodule(norm_path)
            eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
            key = f"{index}.{norm_path}"

            def hook(module, args, key=key, eps=eps):
                h = args[0].detach().float().flatten(0, -2)
                captured.setdefault(key, []).append((h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)).cpu())

            hooks.append(norm.register_forward_pre_hook(hook))
            weight = torch.cat([block.get_submodule(path).weight.detach().float().cpu() for path in readers])
            groups.append((key, weight * norm.weight.detach().float().cpu()))
    ids = context.calibration_tokens()
    rows = max(1, min(len(ids), -(-tokens // ids.shape[1])))
    try:
        for batch in ids[:rows].split(1):
            context.logits(batch.to(context.device))
    finally:
        for handle in hooks:
            handle.remove()
    generator = torch.Generator().manual_seed(seed)
    result = []
    for key, weight in groups:
        x = torch.cat(captured[key])
        pick = torch.randperm(len(x), generator=generator)[:tokens]
        result.append((x[pick], weight))
    return result


def set_weight(linear: nn.Linear, weight: torch.Tensor) -> None:
    linear.weight.data = weight.to(linear.weight.dtype)


def read_stream(linear: nn.Linear, gain: torch.Tensor | None, rotation: torch.Tensor) -> None:
    """A linear reading the (normed) residual stream: ``W diag(gain) Q``."""
    weight = linear.weight.double()
    if gain is not None:
        weight = weight * gain.double().to(weight.device)
    set_weight(linear, weight @ rotation.to(weight.device))


def write_stream(linear: nn.Linear, rotation: torch.Tensor) -> None:
    """A linear writing the residual stream: ``Q^T W`` (and ``Q^T b``)."""
    rotation = rotation.to(linear.weight.device)
    set_weight(linear, rotation.t() @ linear.weight.double())
    if linear.bias is not None:
        linear.bias.data = (linear.bias.double() @ rotation).to(linear.bias.dtype)


def fold_gain(norm: nn.Module) -> torch.Tensor:
    """The norm's gain, which becomes 1 (the linears after it take it)."""
    gain = norm.weight.detach().clone()
    norm.weight.data.fill_(1.0)
    return gain


def rotate_heads(v_proj: nn.Linear, o_proj: nn.Linear, head_dim: int) -> None:
    """Per head, V's output rows by ``R^T`` and o_proj's input columns by ``R`` (R a Hadamard of head_dim)."""
    r = dense_hadamard(head_dim).to(v_proj.weight.device)
    weight = v_proj.weight.double()
    set_weight(v_proj, (r.t() @ weight.reshape(-1, head_dim, weight.shape[-1])).reshape(weight.shape))
    if v_proj.bias is not None:
        bias = v_proj.bias.double().reshape(-1, head_dim) @ r
        v_proj.bias.data = bias.reshape(-1).to(v_proj.bias.dtype)
    weight = o_proj.weight.double()
    set_weight(o_proj, (weight.reshape(weight.shape[0], -1, head_dim) @ r).reshape(weight.shape))


@register_step("rotate")
@dataclass
class Rotate(Step):
    """QuaRot: random Hadamard rotations folded into the weights (exact), so W4A4 activations lose their outliers."""

    # the families whose norms are plain gains fused into the linears after them, with no norm after a sublayer
    # (exact in fp32 on each, tests/test_rotate.py); Gemma's (1 + w) and OLMo 2's post-norms are not rotated yet
    families = ("llama", "mistral", "qwen2", "qwen3")

    kind = "model"
    needs_calibration = False
    changes_architecture = True  # the MLPs run an online Hadamard; tied embeddings are untied

    seed: int = param(0, "seed of the residual stream's random signs", min=0)
    online_hadamard: bool = param(
        True, "rotate down_proj's input online (a Hadamard per token; needs the native format and our loaders)"
    )
    heads: bool = param(True, "rotate V and o_proj's input per attention head (offline, free at inference)")
    learned_steps: int = param(
        0, "Cayley SGD steps learning the residual rotation from the random Hadamard (SpinQuant's R1; 0: off)", min=0
    )
    learning_rate: float = param(8.0, "Cayley SGD step size of the learned rotation", min=0.0)
    learned_bits: int = param(4, "weight and activation bits of the learned rotation's W+A proxy loss", min=2, max=8)
    learned_tokens: int = param(2048, "calibration tokens per norm in the learned rotation's proxy loss", min=1)

    def check(self) -> None:
        super().check()
        if self.learned_steps:
            self.needs_calibration = True  # the proxy loss reads the calibration tokens' residual stream

    @property
    def needs_native_export(self) -> bool:
        """The online Hadamard is recorded by our native format only (the session's order rules read this)."""
        return self.online_hadamard

    def compress_model(self, context: ModelContext) -> None:
        model, adapter, config = context.model, context.adapter, context.config
        generator = torch.Generator().manual_seed(self.seed)
        rotation = residual_rotation(config.hidden_size, generator)
        if self.learned_steps:
            groups = stream_groups(context, self.learned_tokens, self.seed)
            rotation, first, last = learn_rotation(
                rotation, groups, self.learned_steps, self.learning_rate, self.learned_bits
            )
            context.record("residual_rotation", proxy_loss_start=first, proxy_loss_end=last)
        head = model.get_submodule(adapter.lm_head)
        if context.handle.tied_embeddings:
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
            config.tie_word_embeddings = False
        embed = model.get_submodule(adapter.embed_tokens)
        embed.weight.data = (embed.weight.double() @ rotation.to(embed.weight.device)).to(embed.weight.dtype)
        head_dim = attention_geometry(config).head_dim
        with torch.no_grad():
            for index, block in enumerate(context.blocks):
                online = self.rotate_block(block, adapter, rotation, head_dim)
                context.record(context.handle.block_prefix(index), block=index, online_hadamard_factor=online)
            read_stream(head, fold_gain(model.get_submodule(adapter.final_norm)), rotation)

    def rotate_block(self, block: nn.Module, adapter, rotation: torch.Tensor, head_dim: int) -> int | None:
        """Rotate one block in place; the order of its online Hadamard's factor ``M`` (None: none)."""
        for norm, readers in norm_linear_groups(adapter).items():
            gain = fold_gain(block.get_submodule(norm))
            for path in readers:
                read_stream(block.get_submodule(path), gain, rotation)
        down = block.get_submodule(adapter.linears["down"])
        for role in ("o", "down"):
            write_stream(block.get_submodule(adapter.linears[role]), rotation)
        if self.heads:
            rotate_heads(block.get_submodule(adapter.linears["v"]), block.get_submodule(adapter.linears["o"]), head_dim)
        if not self.online_hadamard:
            return None
        factor = hadamard_factor(down.in_features)
        t = dense_hadamard(down.in_features, factor).to(down.weight.device)
        set_weight(down, down.weight.double() @ t)
        block.set_submodule(adapter.mlp, OnlineHadamardMLP(block.get_submodule(adapter.mlp), factor))
        return factor.shape[0]
