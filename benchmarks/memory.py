"""Peak memory of `compressor apply` against the size of the model it compresses.

Builds a random-weight Llama-shaped checkpoint (default ~3.7 GB in bf16: hidden 2560, 24 layers,
intermediate 6912, vocab 32000), then runs `compressor apply` with RTN w4 g128 in a fresh process
and reads that process's peak resident memory. Also measures the resident memory of a process that
only imports the toolkit (the fixed cost of Python, torch and transformers), so the result shows
both the total and what the model itself adds. Goal: peak RSS <= 0.3 x model size.

    python benchmarks/memory.py [--hidden 2560 --layers 24 --intermediate 6912] [--keep DIR]
    python benchmarks/memory.py --recipe R.yaml ...   # the same for another recipe (e.g. a training step's)
    python benchmarks/memory.py --experts 32 --expert-width 512 --hidden 1024 --layers 8   # a Qwen3-MoE

With ``--experts`` the model is a random Qwen3-MoE (``--experts`` routed experts of ``--expert-width`` per layer,
top 2): its experts are read into per-expert linears one block at a time (``compressor/moe.py``), so the peak
stays one block plus the writer's shard, as for a dense model (goal for MoE: <= 0.35 x model size). With
``--fused`` the checkpoint keeps each layer's experts as transformers 5's fused 3-D tensors (``gate_up_proj``,
``down_proj``): each expert is read as its slice of them, so the peak is the same as for per-expert tensors.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def child_peak_rss(command: list[str]) -> tuple[float, float]:
    """Run ``command`` and return (its peak RSS in bytes, seconds)."""
    script = textwrap.dedent(f"""
        import resource, subprocess, sys, time
        started = time.perf_counter()
        subprocess.run({command!r}, check=True, stdout=subprocess.DEVNULL)
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, time.perf_counter() - started)
    """)
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1])


def build_model(
    folder: Path, hidden: int, layers: int, intermediate: int, experts: int = 0, width: int = 0, fused: bool = False
) -> None:
    family, extra = "llama", ""
    if experts:
        family = "qwen3_moe"
        extra = f", num_experts={experts}, num_experts_per_tok=2, moe_intermediate_size={width}, head_dim=128"
    script = textwrap.dedent(f"""
        import torch
        from compressor.testing import make_random_model
        make_random_model({family!r}, {str(folder)!r}, dtype=torch.bfloat16, hidden_size={hidden},
                          num_hidden_layers={layers}, intermediate_size={intermediate},
                          num_attention_heads={hidden // 80 if not experts else hidden // 128}, num_key_value_heads=8,
                          vocab_size=32000, max_position_embeddings=4096, fused_experts={fused}{extra})
    """)
    subprocess.run([sys.executable, "-c", script], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2560)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--intermediate", type=int, default=6912)
    parser.add_argument("--experts", type=int, default=0, help="a Qwen3-MoE with this many experts per layer")
    parser.add_argument("--expert-width", type=int, default=512, help="each expert's intermediate size")
    parser.add_argument("--fused", action="store_true", help="the MoE's experts stored fused (transformers 5's layout)")
    parser.add_argument("--keep", type=Path, help="build the model here and keep it")
    parser.add_argument(
        "--recipe", type=Path, help="apply this recipe instead of RTN w4 g128 (writes memory-<date>-<recipe name>.json)"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="compressor-memory-"))
    model = args.keep or work / "model"
    if not (model / "config.json").exists():
        build_model(model, args.hidden, args.layers, args.intermediate, args.experts, args.expert_width, args.fused)
    model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    recipe = args.recipe.resolve() if args.recipe else work / "rtn-w4.yaml"
    if not args.recipe:
        recipe.write_text("steps:\n  - rtn: {bits: 4, group_size: 128, symmetric: true}\n")

    baseline, _ = child_peak_rss([sys.executable, "-c", "import compressor, compressor.api, compressor.cli"])
    peak, seconds = child_peak_rss(["compressor", "apply", str(recipe), str(model), "-o", str(work / "out"), "--quiet"])
    out_bytes = sum(f.stat().st_size for f in (work / "out").glob("*.safetensors"))
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} ({platform.machine()}, {platform.processor() or 'cpu'})",
        "command": "python benchmarks/memory.py " + " ".join(sys.argv[1:]),
        "recipe": recipe.read_text() if args.recipe else "rtn w4 g128 symmetric",
        "model_shape": {
            "hidden": args.hidden,
            "layers": args.layers,
            "intermediate": args.intermediate,
            "vocab": 32000,
            **({"experts": args.experts, "expert_width": args.expert_width} if args.experts else {}),
            **({"experts_stored": "fused"} if args.fused else {}),
        },
        "model_gb": round(model_bytes / 1e9, 3),
        "output_gb": round(out_bytes / 1e9, 3),
        "apply_seconds": round(seconds, 1),
        "peak_rss_gb": round(peak / 1e9, 3),
        "import_only_rss_gb": round(baseline / 1e9, 3),
        "peak_rss_over_model": round(peak / model_bytes, 3),
        "peak_rss_above_imports_over_model": round((peak - baseline) / model_bytes, 3),
    }
    RESULTS.mkdir(exist_ok=True)
    name = f"memory-{result['date']}" + (f"-{args.recipe.stem}" if args.recipe else "")
    path = RESULTS / (
        name + (f"-moe{args.experts}" if args.experts else "") + ("-fused" if args.fused else "") + ".json"
    )
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
