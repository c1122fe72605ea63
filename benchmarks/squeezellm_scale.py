"""SqueezeLLM at Llama-3-8B shapes: k-means time per layer and the Fisher pass's peak memory.

    python benchmarks/squeezellm_scale.py                 # on a GPU: 8B shapes, 4 blocks, 16 Fisher samples
    python benchmarks/squeezellm_scale.py --quick         # any machine: 1/8-width shapes, 2 blocks (checks the script)

Builds a random-weight Llama checkpoint with Llama-3-8B's shapes (hidden 4096, 32 heads / 8 KV
heads, SwiGLU 14336, vocab 128256) but only ``--layers`` blocks (random weights are fine for time and
memory), then runs ``compressor apply`` in a fresh process for each configuration: the SqueezeLLM
recipe at 3 and 4 bits (dense-only, and 3 bits with the paper's 0.45 % sparse part), with the Fisher
accumulators on the CPU (default) or on the device, in fp32 or bf16, in one pass or four, the blocks
offloaded or not, and RTN w4 g128 on the same model as the baseline of the same run. From each
``report.json`` it reads the Fisher pass's seconds and peak memory (device and host) and each matrix's
k-means seconds.

Reported: k-means seconds per matrix shape and per block, extrapolated to 32 blocks (8B); Fisher
seconds per calibration sequence and its peak device memory next to the model's bf16 size; and the
whole run's time as a ratio to RTN's.
Writes ``benchmarks/results/squeezellm/scale-<date>-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from compressor.testing import make_random_model  # noqa: E402

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
)
QUICK = dict(
    hidden_size=512,
    intermediate_size=1792,
    num_attention_heads=4,
    num_key_value_heads=1,
    vocab_size=16032,
    max_position_embeddings=1024,
)
FULL_LAYERS = 32


def run_apply(
    steps: list[dict], model: Path, work: Path, samples: int, seq_len: int, device: str, offload: str
) -> dict:
    """One ``compressor apply`` in a fresh process; returns its report and wall time."""
    recipe = {
        "calibration": {"dataset": "demo", "samples": samples, "seq_len": seq_len, "seed": 0},
        "steps": steps,
        "export": {"format": "auto"},
    }
    recipe_path = work / "recipe.json"
    recipe_path.write_text(json.dumps(recipe))
    out = work / "out"
    command = [
        sys.executable,
        "-c",
        "from compressor.cli import main; main()",
        "apply",
        str(recipe_path),
        str(model),
        "-o",
        str(out),
        "--overwrite",
        "--device",
        device,
        "--offload",
        offload,
        "--quiet",
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    report = json.loads((out / "report.json").read_text())
    return {"report": report, "seconds": seconds}


def summarize(name: str, result: dict) -> dict:
    rows = result["report"]["modules"]
    passes = [r for r in rows if r.get("module") == "fisher"]
    fisher = None
    if passes:  # several passes: their seconds add up, the peaks are the largest pass's
        fisher = {
            "passes": len(passes),
            "seconds": sum(r["seconds"] for r in passes),
            **{key: max(r[key] for r in passes) for key in ("peak_rss_gib", "peak_cuda_gib") if key in passes[0]},
        }
    per_shape: dict[str, list[float]] = {}
    blocks: dict[int, float] = {}
    for row in rows:
        if "kmeans_seconds" in row:
            per_shape.setdefault(row["module"].rsplit(".", 1)[-1], []).append(row["kmeans_seconds"])
            block = int(row["module"].split("layers.")[1].split(".")[0])
            blocks[block] = blocks.get(block, 0.0) + row["kmeans_seconds"]
    entry = {"entry": name, "seconds": result["seconds"], "passes": result["report"]["passes"]}
    if fisher is not None:
        entry["fisher"] = fisher
    if per_shape:
        entry["kmeans_seconds_per_matrix"] = {k: sum(v) / len(v) for k, v in per_shape.items()}
        entry["kmeans_seconds_per_block"] = sum(blocks.values()) / len(blocks)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument(
        "--samples", type=int, default=None, help="Fisher calibration sequences (paper: 100; time is linear in it)"
    )
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    shapes = QUICK if args.quick else LLAMA3_8B
    layers = args.layers or (2 if args.quick else 4)
    samples = args.samples or (4 if args.quick else 16)
    device_name = (
        torch.cuda.get_device_name(0)
        if args.device.startswith("cuda")
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )

    entries = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        model = make_random_model("llama", work / "model", dtype=torch.bfloat16, num_hidden_layers=layers, **shapes)
        model_gib = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**30
        print(
            f"model: {layers} blocks of Llama-3-8B shapes{' / 8' if args.quick else ''}, {model_gib:.2f} GiB bf16",
            flush=True,
        )
        configs = [
            ("rtn w4 g128 (baseline)", [{"rtn": {"bits": 4, "group_size": 128, "symmetric": False}}], "no"),
            ("squeezellm w4", [{"squeezellm": {"bits": 4}}], "no"),
            ("squeezellm w3", [{"squeezellm": {"bits": 3}}], "no"),
            (
                "squeezellm w3, 0.45% sparse",
                [{"squeezellm": {"bits": 3, "sensitive_percent": 0.05, "outlier_percent": 0.40}}],
                "no",
            ),
            ("squeezellm w4, offloaded", [{"squeezellm": {"bits": 4}}], "yes"),
            ("squeezellm w4, Fisher on the device", [{"squeezellm": {"bits": 4, "fisher_device": "device"}}], "no"),
            (
                "squeezellm w4, bf16 Fisher accumulators",
                [{"squeezellm": {"bits": 4, "fisher_dtype": "bfloat16"}}],
                "no",
            ),
            ("squeezellm w4, Fisher in 4 passes", [{"squeezellm": {"bits": 4, "fisher_passes": 4}}], "no"),
        ]
        for name, steps, offload in configs:
            entry = summarize(name, run_apply(steps, model, work, samples, args.seq_len, args.device, offload))
            entry["offload"] = offload
            entries.append(entry)
            fisher = entry.get("fisher", {})
            print(
                f"{name}: {entry['seconds']:.1f} s; k-means {entry.get('kmeans_seconds_per_block', 0):.2f} s/block; "
                f"Fisher {fisher.get('seconds', 0):.1f} s, peak device {fisher.get('peak_cuda_gib', 0):.2f} GiB, "
                f"peak host {fisher.get('peak_rss_gib', 0):.2f} GiB",
                flush=True,
            )
    write(entries, args, layers, samples, model_gib, device_name)


def write(entries: list[dict], args, layers: int, samples: int, model_gib: float, device_name: str) -> None:
    date = datetime.date.today().isoformat()
    command = (
        "python benchmarks/squeezellm_scale.py"
        + (" --quick" if args.quick else "")
        + (f" --layers {args.layers}" if args.layers else "")
        + (f" --samples {args.samples}" if args.samples else "")
    )
    width = "1/8-width " if args.quick else ""
    setting = (
        f"random-weight Llama with {width}Llama-3-8B shapes, {layers} blocks ({model_gib:.2f} GiB bf16); "
        f"Fisher from {samples} demo sequences of {args.seq_len} tokens; "
        f"device {device_name}, torch {torch.__version__}"
    )
    baseline = entries[0]["seconds"]
    out = ROOT / "benchmarks" / "results" / "squeezellm"
    out.mkdir(parents=True, exist_ok=True)
    tag = (
        "".join(c if c.isalnum() else "-" for c in device_name.lower()).strip("-")
        if args.device.startswith("cuda")
        else "cpu"
    )
    (out / f"scale-{date}-{tag}.json").write_text(
        json.dumps({"command": command, "setting": setting, "entries": entries}, indent=2)
    )
    lines = [
        f"# SqueezeLLM at 8B shapes, {date}",
        "",
        f"Measured by `{command}` on {date}: {setting}.",
        "",
        f"k-means per block x {FULL_LAYERS} = the estimate for a whole {width}8B-shaped model. "
        "Fisher peak memory is the pass's own peak "
        "(device allocator since the pass began; host: the process's peak resident set).",
        "",
        "| entry | offload | apply (s) | vs RTN | k-means s/block | x32 blocks (min) | Fisher s/sequence | "
        "Fisher peak device (GiB) | peak host (GiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def number(value, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for e in entries:
        fisher = e.get("fisher") or {}
        per_block = e.get("kmeans_seconds_per_block")
        whole = None if per_block is None else per_block * FULL_LAYERS / 60
        per_sequence = fisher["seconds"] / samples if fisher else None
        lines.append(
            f"| {e['entry']} | {e['offload']} | {e['seconds']:.1f} | {e['seconds'] / baseline:.1f}x | "
            f"{number(per_block, 2)} | "
            f"{number(whole, 1)} | {number(per_sequence, 2)} | {number(fisher.get('peak_cuda_gib'), 2)} | "
            f"{number(fisher.get('peak_rss_gib'), 2)} |"
        )
    shapes = entries[1].get("kmeans_seconds_per_matrix", {})
    if shapes:
        lines += [
            "",
            "k-means seconds per matrix (squeezellm w4, mean over blocks): "
            + ", ".join(f"{name} {seconds:.3f}" for name, seconds in shapes.items()),
            "",
        ]
    (out / f"scale-{date}-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
