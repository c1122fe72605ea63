"""Where the KL of FP8 W8A8 comes from, and what moves it: dynamic per-token E4M3 activations alone (weights exact).

    python -P benchmarks/fp8_activations.py [--model demo --text demo] [--windows 16]

Every block linear's input goes through the per-token FP8 quantizer (``weights/values.fake_quantize_float_tokens``,
amax / 448 per token); the mean per-token KL to the unquantized model is measured on held-out windows of 512 tokens
(fp32 on the CPU, as ``benchmarks/quality.py``). Rows: all linears; vLLM's arithmetic (fp32 scale clamped at
1 / (448 * 512), ``x * (1 / scale)``; tests/kernels/quant_utils.py ``ref_dynamic_per_token_quant``); one linear role
at a time; scales per group of 128 channels (FP8 block W8A8's activations); SmoothQuant smoothing
``s_j = max|x_j|^a / max|W_j|^(1-a)`` (x / s quantized, s folded back exactly, so only the activation error
changes); QuaRot rotations (``rotate``: residual stream, per-head V/O, with and without the online Hadamard before
down_proj, two seeds), exact before quantization; the best linear compensation of the activation error on the
weight side, ``W' = W E[x q^T] (E[q q^T] + ridge)^-1`` with ``q`` the FP8 input (fp weights, calibration text).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

from compressor.arch import adapter_for, attention_geometry
from compressor.demo import demo_text_path
from compressor.eval import heldout_stream, load_causal_lm, logits_of, make_windows
from compressor.quant.rotate import Rotate, fold_gain, read_stream, residual_rotation
from compressor.weights.values import E4M3_MAX, fake_quantize_float_tokens


def per_token(x):
    return fake_quantize_float_tokens(x, "fp8")


def vllm_arithmetic(x):
    scale = torch.clamp(x.abs().amax(-1, keepdim=True).float() / E4M3_MAX, min=1.0 / (E4M3_MAX * 512.0))
    return ((x.float() * (1.0 / scale)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def group_128(x):
    return per_token(x.unflatten(-1, (x.shape[-1] // 128, 128))).flatten(-2)


def block_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def mean_kl(model, windows, base, quantize, select=lambda name: True, smooth=None) -> float:
    def hook(scale):
        if scale is None:
            return lambda module, args: (quantize(args[0]),)
        return lambda module, args: ((quantize(args[0] / scale) * scale).to(args[0].dtype),)

    hooks = [
        m.register_forward_pre_hook(hook(None if smooth is None else smooth[n]))
        for n, m in block_linears(model).items()
        if select(n)
    ]
    total = tokens = 0.0
    with torch.no_grad():
        for batch, reference in zip(windows.split(4), base):
            logp = F.log_softmax(logits_of(model, batch)[:, :-1], -1)
            total += float((reference.exp() * (reference - logp)).sum())
            tokens += logp.shape[0] * logp.shape[1]
    for h in hooks:
        h.remove()
    return total / tokens


def rotated(model, online: bool, seed: int):
    model = copy.deepcopy(model)
    adapter = adapter_for(model.config)
    rotation = residual_rotation(model.config.hidden_size, torch.Generator().manual_seed(seed))
    embed = model.get_submodule(adapter.embed_tokens)
    embed.weight.data = (embed.weight.double() @ rotation).to(embed.weight.dtype)
    step = Rotate(seed=seed, online_hadamard=online)
    with torch.no_grad():
        for block in model.get_submodule(adapter.blocks):
            step.rotate_block(block, adapter, rotation, attention_geometry(model.config).head_dim)
        read_stream(model.get_submodule(adapter.lm_head), fold_gain(model.get_submodule(adapter.final_norm)), rotation)
    return model


def noise_compensated(model, windows, ridge: float):
    """A copy whose block linears minimise ``E|W x - W' q(x)|^2`` over the windows' tokens (each linear's fp inputs
    ``x`` and their FP8 rounding ``q``): ``W' = W C_xq (C_qq + ridge mean(diag) I)^-1``, the Wiener solve."""
    linears = block_linears(model)
    xq = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in linears.items()}
    qq = {n: torch.zeros_like(xq[n]) for n in linears}

    def observe(name):
        def hook(module, args):
            x, q = args[0].flatten(0, -2).double(), per_token(args[0]).flatten(0, -2).double()
            xq[name] += x.T @ q
            qq[name] += q.T @ q

        return hook

    hooks = [m.register_forward_pre_hook(observe(n)) for n, m in linears.items()]
    with torch.no_grad():
        for batch in windows.split(4):
            logits_of(model, batch)
    for h in hooks:
        h.remove()
    compensated = copy.deepcopy(model)
    for name, module in block_linears(compensated).items():
        c = qq[name] + ridge * qq[name].diagonal().mean() * torch.eye(qq[name].shape[0], dtype=torch.float64)
        module.weight.data = (module.weight.double() @ torch.linalg.solve(c, xq[name].T).T).to(module.weight.dtype)
    return compensated


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--text", default="demo")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--calibration", default=None, help="text for the weight compensation (default: the demo's)")
    args = parser.parse_args()
    model, tokenizer = load_causal_lm(args.model)
    windows = make_windows(heldout_stream(tokenizer, args.text), 512, args.windows)
    amax = {n: torch.zeros(m.in_features) for n, m in block_linears(model).items()}

    def observe(name):
        return lambda module, a: amax.__setitem__(name, torch.maximum(amax[name], a[0].abs().flatten(0, -2).amax(0)))

    hooks = [m.register_forward_pre_hook(observe(n)) for n, m in block_linears(model).items()]
    with torch.no_grad():
        base = [F.log_softmax(logits_of(model, b)[:, :-1], -1) for b in windows.split(4)]
    for h in hooks:
        h.remove()
    rows = [("per token, every block linear", mean_kl(model, windows, base, per_token))]
    rows.append(("per token, vLLM's arithmetic", mean_kl(model, windows, base, vllm_arithmetic)))
    for role in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        rows.append((f"per token, {role} only", mean_kl(model, windows, base, per_token, lambda n, r=role: r in n)))
    rows.append(("per group of 128 channels", mean_kl(model, windows, base, group_128)))
    linears = block_linears(model)
    for alpha in (0.5, 0.8, 1.0):
        smooth = {
            n: amax[n].clamp(min=1e-5) ** alpha / linears[n].weight.abs().amax(0).float().clamp(min=1e-5) ** (1 - alpha)
            for n in linears
        }
        rows.append((f"SmoothQuant alpha {alpha}", mean_kl(model, windows, base, per_token, smooth=smooth)))
    for online in (False, True):
        for seed in (0, 1):
            rows.append(
                (
                    f"rotate (online Hadamard {online}, seed {seed})",
                    mean_kl(rotated(model, online, seed), windows, base, per_token),
                )
            )
    calibration = args.calibration or str(demo_text_path("calibration"))
    calibration_windows = make_windows(heldout_stream(tokenizer, calibration), 512, 32)
    for ridge in (1e-6, 1e-4, 1e-2):
        compensated = noise_compensated(model, calibration_windows, ridge)
        rows.append(
            (f"weights compensating the FP8 error (ridge {ridge})", mean_kl(compensated, windows, base, per_token))
        )
    print(f"model {args.model}, {len(windows)} windows of 512 tokens; mean per-token KL (nats), weights exact")
    print("| activations | KL |\n|---|---|")
    for name, kl in rows:
        print(f"| {name} | {kl:.3e} |")


if __name__ == "__main__":
    main()
