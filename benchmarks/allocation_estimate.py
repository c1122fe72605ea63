"""How well bit allocation's KL estimate (compressor/quant/allocation.py) predicts the KL it stands for.

For every unit a serving engine fuses (q/k/v, o, gate/up, down of each block) and each scheme: GPTQ of that
unit alone (Hessians of the original model's inputs), every other weight original, and the mean per-token KL
from the original on held-out windows, beside the estimate 1/2 sum_j F_j (D H D^T)_jj / T^2 (F: the squared
gradient of the summed next-token loss at each output channel over the calibration tokens; D: GPTQ's error;
H: sum x x^T). Then every unit at the scheme together, to see whether the units' KLs add up. One JSON row per
(unit, scheme) to OUT, and a summary per scheme: the log-correlation and the ratios estimate / measured.

    PYTHONPATH=. python -P benchmarks/allocation_estimate.py demo OUT.json [--schemes w2g64 w3g128 w4g128]
    PYTHONPATH=. python -P benchmarks/allocation_estimate.py /work/second/model OUT.json   # text beside the model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from compressor.calibration import sample_windows, tokenize_stream
from compressor.demo import demo_text_path
from compressor.eval import load_causal_lm, logits_of, make_windows
from compressor.quant.allocation import parse_scheme
from compressor.quant.gptq import add_to_hessian, gptq_quantize, hessian

UNITS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


def texts(model: str) -> tuple[str, str]:
    if model == "demo":
        return demo_text_path("calibration").read_text(), demo_text_path("heldout").read_text()
    data = Path(model).parent / "data"
    return (data / "calibration.txt").read_text(), (data / "heldout.txt").read_text()


def statistics(model, calibration: torch.Tensor, linears: dict) -> tuple[dict, dict]:
    """Input sums x x^T and output Fisher sums of every linear over the calibration tokens."""
    sums = {name: torch.zeros(m.in_features, m.in_features) for name, m in linears.items()}
    fisher = {name: torch.zeros(m.out_features) for name, m in linears.items()}

    def catch_input(name):
        def hook(module, args, output):
            add_to_hessian(sums[name], args[0].detach())

        return hook

    def catch_gradient(name):
        def hook(module, grad_input, grad_output):
            fisher[name].add_(grad_output[0].float().square().flatten(0, -2).sum(0))

        return hook

    hooks = []
    for name, module in linears.items():
        hooks.append(module.register_forward_hook(catch_input(name)))
        hooks.append(module.register_full_backward_hook(catch_gradient(name)))
    for p in model.parameters():
        p.requires_grad_(False)
    for module in linears.values():
        module.weight.requires_grad_(True)
    for batch in calibration.split(1):
        logits = model(batch).logits[:, :-1].float()
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        model.zero_grad()
        loss.backward()
    for handle in hooks:
        handle.remove()
    for module in linears.values():
        module.weight.requires_grad_(False)
    return sums, fisher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("--schemes", nargs="+", default=["w2g64", "w3g128", "w4g128"])
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(args.model, dtype=torch.float32)
    calibration_text, heldout_text = texts(args.model)
    calibration = sample_windows(tokenize_stream(tokenizer, [calibration_text]), 32, 512, 0)
    heldout = make_windows(tokenize_stream(tokenizer, [heldout_text]), 512, args.windows)
    layers = model.model.layers
    linears = {f"{i}.{path}": layer.get_submodule(path) for i, layer in enumerate(layers) for u in UNITS.values()
               for path in u}  # fmt: skip
    sums, fisher = statistics(model, calibration, linears)
    tokens = calibration.numel()
    with torch.no_grad():
        base = [F.log_softmax(logits_of(model, b)[:, :-1], -1) for b in heldout.split(4)]

    @torch.no_grad()
    def kl() -> float:
        total = count = 0.0
        for batch, reference in zip(heldout.split(4), base):
            log_probs = F.log_softmax(logits_of(model, batch)[:, :-1], -1)
            total += float((reference.exp() * (reference - log_probs)).sum())
            count += batch[:, 1:].numel()
        return total / count

    rows = []
    for text in args.schemes:
        bits, group_size = parse_scheme(text)
        quantized = {}
        for name, module in linears.items():
            w = module.weight.data.float()
            q = gptq_quantize(w, hessian(sums[name], tokens), bits, group_size, False, torch.float16).weight
            quantized[name] = q.dequantize(torch.float32)
        for layer in range(len(layers)):
            for unit, paths in UNITS.items():
                names = [f"{layer}.{p}" for p in paths]
                saved = {n: linears[n].weight.data for n in names}
                estimate = 0.0
                for n in names:
                    error = quantized[n] - saved[n].float()
                    estimate += 0.5 * float((fisher[n] * ((error @ sums[n]) * error).sum(1)).sum()) / tokens**2
                    linears[n].weight.data = quantized[n]
                rows.append({"scheme": text, "layer": layer, "unit": unit, "kl": kl(), "estimate": estimate})
                for n in names:
                    linears[n].weight.data = saved[n]
                print(json.dumps(rows[-1]), flush=True)
        saved = {n: m.weight.data for n, m in linears.items()}
        for n, m in linears.items():
            m.weight.data = quantized[n]
        rows.append({"scheme": text, "layer": -1, "unit": "all", "kl": kl()})
        for n, m in linears.items():
            m.weight.data = saved[n]
        units = [r for r in rows if r["scheme"] == text and r["layer"] >= 0]
        measured = torch.tensor([r["kl"] for r in units]).clamp(min=1e-30).log()
        estimated = torch.tensor([r["estimate"] for r in units]).clamp(min=1e-30).log()
        ratio = (estimated - measured).exp()
        top = max(units, key=lambda r: r["kl"])
        print(
            f"{text}: log-correlation {torch.corrcoef(torch.stack([measured, estimated]))[0, 1]:.4f}, estimate / "
            f"measured median {ratio.median():.3g} (min {ratio.min():.3g}, max {ratio.max():.3g}); sum of units "
            f"{sum(r['kl'] for r in units):.4g}, all together {rows[-1]['kl']:.4g}; largest unit layer "
            f"{top['layer']} {top['unit']}: {top['kl'] / sum(r['kl'] for r in units):.1%} of the sum"
        )
        Path(args.output).write_text(json.dumps(rows, indent=1))  # after each scheme


if __name__ == "__main__":
    main()
