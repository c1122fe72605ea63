"""Peak memory of EfficientQAT's E2E-QP: only the scales train, so memory stays near the quantized model's.

Builds a random-weight Llama-shaped model (hidden 1024, 8 layers, 111M parameters, bf16), applies RTN
w2g64 asymmetric and then ``efficientqat_e2e_qp`` in one recipe, and records the peak memory of each pass
(process RSS on the CPU; on a GPU also the device's peak allocation) beside what full quantization-aware
training would need for its tensors alone (fp32 weights + gradients + two Adam moments = 16 bytes a
parameter). E2E-QP runs with ``objective: next_token`` here, the training alone; the default
``distill`` first runs the original model once over the calibration set (block by block when offloaded).

    python benchmarks/e2e_qp_memory.py            # writes benchmarks/results/e2e-qp-memory-<date>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from compressor import Recipe, apply
from compressor.testing import make_random_model

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=4096,
    max_position_embeddings=512,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    recipe = Recipe.from_dict(
        {
            "calibration": {"dataset": "demo", "samples": 4, "seq_len": 256},
            "steps": [
                {"rtn": {"bits": 2, "group_size": 64, "symmetric": False}},
                {
                    "efficientqat_e2e_qp": {
                        "objective": "next_token",
                        "lr": 2e-5,
                        "batch_size": 2,
                        "micro_batch_size": 1,
                        "epochs": 1,
                    }
                },
            ],
        }
    )
    with tempfile.TemporaryDirectory() as work:
        model = make_random_model("llama", Path(work) / "model", dtype=torch.bfloat16, **SHAPE)
        started = time.perf_counter()
        report = apply(recipe, model, Path(work) / "out", progress=False, device=args.device)
        seconds = time.perf_counter() - started
    hidden, inter, layers, vocab = (
        SHAPE["hidden_size"],
        SHAPE["intermediate_size"],
        SHAPE["num_hidden_layers"],
        SHAPE["vocab_size"],
    )
    block_parameters = layers * (4 * hidden * hidden + 3 * hidden * inter)
    parameters = block_parameters + 2 * vocab * hidden
    trained = [row for row in report.rows if row["step"] == "efficientqat_e2e_qp"]
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": (
            f"{platform.system()} {platform.machine()}, {torch.get_num_threads()} threads, "
            f"device {args.device}, torch {torch.__version__}"
        ),
        "command": "python benchmarks/e2e_qp_memory.py" + ("" if args.device == "cpu" else f" --device {args.device}"),
        "model": {
            "shape": SHAPE,
            "parameters": parameters,
            "block_parameters": block_parameters,
            "bf16_gib": parameters * 2 / 2**30,
        },
        "passes": report.passes,
        "e2e_qp_rows": trained,
        "full_qat_fp32_tensors_gib": parameters * 16 / 2**30,
        "seconds": seconds,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"e2e-qp-memory-{record['date']}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
