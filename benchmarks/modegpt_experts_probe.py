"""Does MoDeGPT's MLP compression hold up per expert? A probe, before the ``modegpt`` step takes MoE models.

For every expert of a MoE model (held whole in memory: small models only) the correlation ``C = sum z z^T`` of its
intermediate activations over the tokens routed to it (calibration text, the original model), then each expert
keeps ``--keep`` of its neurons three ways: MoDeGPT's Type I (``compressor.lowrank.modegpt.nystrom_mlp``: ridge
leverage scores, ``down`` refitted in closed form), the same neurons without the refit, and the neurons of most
energy (``diag C``) without the refit. Scored as ``benchmarks/quality.py`` scores (held-out windows, mean
per-token KL from the original model). The ``modegpt`` step does the first (``export: masked``) on MoE models.

    PYTHONPATH=. python -P benchmarks/modegpt_experts_probe.py --model demo-moe --keep 96 --keep 64
    PYTHONPATH=. python -P benchmarks/modegpt_experts_probe.py --model /work/second-moe/model \
        --text /work/second/data/heldout.txt --calibration /work/second/data/calibration.txt --keep 96 --keep 64
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import subprocess
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer

from compressor.calibration import calibration_tokens
from compressor.eval import evaluate, heldout_stream, make_windows
from compressor.lowrank.modegpt import down_correlations, nystrom_mlp, ridge_leverage_scores
from compressor.model import ModelHandle
from compressor.moe import RoutedExperts
from compressor.recipe import Recipe


def expert_correlations(model, tokens: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """(layer, expert) -> the sum of z z^T over the tokens routed to the expert (z: its down projection's input)."""
    layers = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    downs = {(li, ei): expert.projections()[2] for li, layer in enumerate(layers) for ei, expert in enumerate(layer)}
    with torch.no_grad(), down_correlations(downs) as stats:
        for batch in tokens.split(4):
            model(batch)
    return stats


def linear_of(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.float().contiguous()
    return linear


def compressed(model, stats, keep: int, variant: str):
    model = copy.deepcopy(model)
    for li, layer in enumerate(m for m in model.modules() if isinstance(m, RoutedExperts)):
        for ei, expert in enumerate(layer):
            gate, up, down = (linear.weight for linear in expert.projections())
            correlation = stats.get((li, ei))
            if correlation is None:  # an expert no calibration token reached: keep its first neurons
                correlation = torch.eye(gate.shape[0], dtype=torch.float64)
            if variant == "nystrom":
                gate, up, down, _ = nystrom_mlp(gate, up, down, correlation, keep)
            else:
                score = (
                    ridge_leverage_scores(correlation) if variant == "leverage, no refit" else correlation.diagonal()
                )
                index = score.topk(keep).indices.sort().values
                gate, up, down = gate[index], up[index], down[:, index]
            for name, weight in zip(expert.names, (gate, up, down)):
                setattr(expert, name, linear_of(weight))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-moe")
    parser.add_argument("--text", default="demo", help="held-out text")
    parser.add_argument("--calibration", default="demo", help="calibration text")
    parser.add_argument("--keep", type=int, action="append", help="neurons kept per expert; repeatable")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "moe")
    args = parser.parse_args()
    torch.manual_seed(0)
    handle = ModelHandle.open(args.model)
    model = handle.materialize_all("cpu", torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(handle.path)
    recipe = Recipe.from_dict(
        {"calibration": {"dataset": args.calibration, "samples": 32, "seq_len": 512, "seed": 0}, "steps": [{"rtn": {}}]}
    )
    stats = expert_correlations(model, calibration_tokens(tokenizer, recipe.calibration))
    windows = make_windows(heldout_stream(tokenizer, args.text), 512, args.windows)
    width = next(m for m in model.modules() if isinstance(m, RoutedExperts))[0].projections()[0].out_features
    rows = []
    for keep in args.keep or [width * 3 // 4]:
        for variant in ("nystrom", "leverage, no refit", "energy, no refit"):
            result = evaluate(compressed(model, stats, keep, variant), windows, base=model)
            rows.append(
                {
                    "keep": keep,
                    "width": width,
                    "variant": variant,
                    "perplexity": result.perplexity,
                    "kl": result.kl_divergence,
                }
            )
            print(rows[-1], flush=True)
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} ({platform.machine()})",
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "command": "python benchmarks/modegpt_experts_probe.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("output", "keep"))
        + "".join(f" --keep {k}" for k in args.keep or []),
        "fp_perplexity": evaluate(model, windows).perplexity,
        "windows": len(windows),
        "rows": rows,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    name = Path(str(args.model)).parent.name if "/" in str(args.model) else str(args.model)
    path = args.output / f"modegpt-experts-probe-{name}-{record['date']}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
