"""Scale-out benchmark: one recipe on 1 and N processes of this machine (``compressor apply --nproc N``).

    python benchmarks/distributed.py                                   # demo model, GPTQ w4g128, 1 and 2 processes
    python benchmarks/distributed.py --recipe recipes/squeezellm-w3.yaml --nproc 1 --nproc 2 --nproc 4
    python benchmarks/distributed.py --model /work/second/model --calibration /work/second/data/calibration.txt

Rows, per world size: the wall time of the whole command (interpreter start, launcher, loading and export
included), each rank's peak resident memory (and peak CUDA allocation on GPUs), the bytes of calibration
activations each rank held (the hidden states entering a block, for its share of the samples: the number the
issue's target is about), the bytes each rank sent and received in collectives (in total and per block), and
the quality of the result: perplexity and mean per-token KL from the uncompressed model on held-out windows
(``compressor eval``'s functions). ``torchrun 1`` is world size 1 under torch's launcher (``torchrun
--standalone --nproc-per-node 1``): the launcher's and process group's overhead against the plain run.

Results go to ``--output-dir`` as ``distributed.md`` and ``distributed.json`` with the date, machine, command
and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_apply(recipe: Path, model: str, output: Path, nproc: int | None, launcher: bool = False) -> float:
    """Seconds the command took; raises with its stderr if it failed."""
    if launcher:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
        command += ["-m", "compressor", "apply", str(recipe), model, "-o", str(output), "--quiet"]
    else:
        command = [sys.executable, "-m", "compressor", "apply", str(recipe), model, "-o", str(output), "--quiet"]
        if nproc:
            command += ["--nproc", str(nproc)]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[-2000:]}")
    return seconds


def quality(output: Path, model: str, text: str, seq_len: int, windows: int) -> dict:
    from compressor.eval import evaluate_paths

    result = evaluate_paths(str(output), model, text, seq_len, windows, torch.device("cpu"), progress=False)
    return {"perplexity": round(result.perplexity, 4), "kl": round(result.kl_divergence, 6)}


def row(label: str, world: int, seconds: float, output: Path, blocks: int, held: int, scores: dict) -> dict:
    """``held``: the bytes of hidden states one process holds for all the samples (world size 1 reports no
    per-rank numbers; several processes report theirs, which the table shows beside it)."""
    summary = json.loads((output / "report.json").read_text())["summary"]
    ranks = summary.get("distributed", {}).get("ranks")
    if ranks is None:  # one process: its pass's peak memory, and the activations it holds computed
        passes = json.loads((output / "report.json").read_text())["passes"]
        ranks = [{"peak_rss_gib": max(p["peak_rss_gib"] for p in passes), "calibration_activation_bytes": held}]
    return {
        "run": label,
        "processes": world,
        "seconds": round(seconds, 1),
        "ranks": ranks,
        "bytes_moved_per_block": [round(r.get("bytes_moved", 0) / blocks) for r in ranks],
        **scores,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "gptq-w4g128.yaml"))
    parser.add_argument("--calibration", help="calibration text replacing the recipe's dataset")
    parser.add_argument("--samples", type=int, help="calibration samples replacing the recipe's")
    parser.add_argument("--text", default="demo", help="held-out text for the quality columns")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--nproc", type=int, action="append", help="world sizes (default: 1 and 2)")
    parser.add_argument("--no-launcher-row", action="store_true", help="skip world size 1 under torchrun")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results" / "distributed")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from compressor.model import ModelHandle

    handle = ModelHandle.open(args.model)
    blocks = len(handle.blocks)
    settings = yaml.safe_load(Path(args.recipe).read_text())
    if args.calibration:
        settings["calibration"]["dataset"] = args.calibration
    if args.samples:
        settings["calibration"]["samples"] = args.samples
    rows = []
    with tempfile.TemporaryDirectory(prefix="distributed-benchmark-") as folder:
        recipe = Path(folder) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(settings, sort_keys=False))
        runs = [(f"{n} process{'es' if n > 1 else ''}", n, n if n > 1 else None, False) for n in args.nproc or [1, 2]]
        if not args.no_launcher_row:
            runs.insert(1, ("torchrun 1", 1, None, True))
        for label, world, nproc, launcher in runs:
            output = Path(folder) / f"out-{len(rows)}"
            seconds = run_apply(recipe, args.model, output, nproc, launcher)
            scores = quality(output, args.model, args.text, args.seq_len, args.windows)
            calibration = settings["calibration"]
            held = calibration["samples"] * calibration["seq_len"] * handle.config.hidden_size * 4  # fp32 on the CPU
            rows.append(row(label, world, seconds, output, blocks, held, scores))
            print(json.dumps(rows[-1]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    record = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (gloo on the CPU)"),
        "command": " ".join(["python", "benchmarks/distributed.py", *sys.argv[1:]]),
        "commit": commit.strip(),
        "model": args.model,
        "recipe": settings,
        "blocks": blocks,
        "rows": rows,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "distributed.json").write_text(json.dumps(record, indent=2))
    (args.output_dir / "distributed.md").write_text(markdown(record))
    print(markdown(record))


def markdown(record: dict) -> str:
    lines = [
        f"# Scale-out: {record['model']}, {len(record['recipe']['steps'])} step(s) "
        f"({', '.join(next(iter(s)) for s in record['recipe']['steps'])}), {record['blocks']} blocks",
        "",
        f"{record['date']}; {record['machine']}; commit {record['commit']}",
        f"`{record['command']}`",
        "",
        "| run | wall s | peak RSS GiB per rank | calibration activations MiB per rank "
        "| bytes moved per block per rank | perplexity | KL |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        rss = " / ".join(f"{rank['peak_rss_gib']:.3f}" for rank in r["ranks"])
        acts = " / ".join(
            "-"
            if rank["calibration_activation_bytes"] is None
            else f"{rank['calibration_activation_bytes'] / 2**20:.1f}"
            for rank in r["ranks"]
        )
        moved = " / ".join(f"{b / 2**20:.2f} MiB" for b in r["bytes_moved_per_block"])
        lines.append(f"| {r['run']} | {r['seconds']} | {rss} | {acts} | {moved} | {r['perplexity']} | {r['kl']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
