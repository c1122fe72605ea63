"""benchmarks/kernels.py runs (under the interpreter on a CPU) and writes its table, JSON and plot."""

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_smoke_run_writes_markdown_json_and_plot(tmp_path):
    bench = load_benchmark()
    args = ["--shapes", "cpu", "--m", "1", "--bits", "3", "--lut", "4", "--out", str(tmp_path), "--command", "pytest smoke"]
    if torch.cuda.is_available():
        args[1] = "8b"
    table = bench.main(args)
    text = table.read_text()
    assert "pytest smoke" in text and "| ours uniform | 3 |" in text and "| ours lut | 4 |" in text
    result = json.loads(table.with_suffix(".json").read_text())
    ours = [row for row in result["rows"] if row["kernel"].startswith("ours")]
    assert len(ours) == 2 * len({row["shape"] for row in result["rows"]})
    assert all(row["us"] > 0 and row["max_rel_err"] < 2e-3 for row in ours)
    if not torch.cuda.is_available():
        assert bench.CPU_NOTE in text and result["meta"]["interpreter"]
    if importlib.util.find_spec("matplotlib"):
        assert table.with_suffix(".png").stat().st_size > 1000


def test_memory_floor_and_peak_bandwidth():
    bench = load_benchmark()
    assert bench.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert bench.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert bench.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert bench.bytes_moved(4096 * 4096 // 2, 1, 4096, 4096) == 4096 * 4096 // 2 + 2 * 4096 * 2
