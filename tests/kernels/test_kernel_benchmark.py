"""benchmarks/kernel_speed.py: runs (under the interpreter on a CPU), writes rows as they finish, stops on
time, knows the device check, and reads issue 19's targets off its rows."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_speed.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_smoke_run_writes_markdown_json_rows_and_plot(tmp_path):
    bench = load_benchmark()
    args = [
        "--shapes",
        "cpu",
        "--m",
        "1",
        "--bits",
        "3",
        "--lut",
        "4",
        "--out",
        str(tmp_path),
        "--command",
        "pytest smoke",
    ]
    if torch.cuda.is_available():
        args[1] = "8b"
    table = bench.main(args)
    text = table.read_text()
    assert "pytest smoke" in text and "| ours uniform | 3 |" in text and "| ours lut | 4 |" in text
    result = json.loads(table.with_suffix(".json").read_text())
    ours = [row for row in result["rows"] if row["kernel"].startswith("ours")]
    shapes = len({row["shape"] for row in result["rows"]})
    assert len([row for row in ours if row["kernel"] in ("ours uniform", "ours lut")]) == 2 * shapes
    assert len([row for row in ours if row["kernel"] == "ours uniform (3-bit planes)"]) == shapes  # the old layout
    assert all(row["us"] > 0 and row["max_rel_err"] < 2e-3 and row["config"]["schedule"] == "decode" for row in ours)
    streamed = [json.loads(line) for line in table.with_suffix(".jsonl").read_text().splitlines()]
    assert streamed == result["rows"]
    assert [t["target"] for t in result["targets"]] == [t[0] for t in bench.TARGETS]
    if not torch.cuda.is_available():
        assert bench.CPU_NOTE in text and result["meta"]["interpreter"]
    if importlib.util.find_spec("matplotlib"):
        assert table.with_suffix(".png").stat().st_size > 1000


def test_rows_reach_the_disk_as_they_finish_and_max_seconds_stops_cleanly(tmp_path, monkeypatch):
    """A run cut short keeps every finished row: on disk after each row, and the table says it stopped."""
    bench = load_benchmark()
    seen_on_disk = []
    add = bench.Recorder.add

    def add_and_look(self, row):
        add(self, row)
        seen_on_disk.append(len(self.stem.with_suffix(".jsonl").read_text().splitlines()))

    monkeypatch.setattr(bench.Recorder, "add", add_and_look)
    clock = iter(range(0, 10**6, 10))  # every look at the clock advances it 10 s
    monkeypatch.setattr(bench.time, "monotonic", lambda: next(clock))
    table = bench.main(
        [
            "--shapes",
            "cpu",
            "--m",
            "1",
            "--bits",
            "4",
            "--lut",
            "",
            "--out",
            str(tmp_path),
            "--max-seconds",
            "35",
            "--no-plot",
        ]
    )
    result = json.loads(table.with_suffix(".json").read_text())
    rows = result["rows"]
    assert 0 < len(rows) < 6  # 2 shapes x (fp32, ours, tinygemm) would be 6
    assert seen_on_disk == list(range(1, len(rows) + 1))
    assert "stopped early" in table.read_text() and result["meta"]["stopped"].startswith("--max-seconds 35")


def test_device_check_is_the_target_rows_within_six_minutes():
    bench = load_benchmark()
    args = bench.parse_args(["--device-check"])
    assert args.m == [1, 16, 64, 256] and sorted(args.bits) == [2, 3, 4, 8] and sorted(args.lut) == [3, 4]
    assert args.tune and args.max_seconds <= 360 and args.tune_candidates <= 8
    assert args.shapes == (["8b"] if torch.cuda.is_available() else ["cpu"])
    order = bench.shape_order(args)
    shapes = len(bench.SHAPES[args.shapes[0]])
    assert [m for m, _ in order] == [m for m in (1, 16, 64, 256) for _ in range(shapes)]  # every shape at M = 1 first
    assert bench.should_tune(args, "uniform", 4, 256) and bench.should_tune(args, "lut", 4, 1)
    assert not bench.should_tune(args, "uniform", 8, 1) and not bench.should_tune(args, "lut", 4, 16)


def row(shape, m, kernel, bits, us, **extra):
    return {"shape": shape, "M": m, "kernel": kernel, "bits": bits, "us": us, **extra}


def test_targets_are_read_off_the_worst_shape():
    bench = load_benchmark()
    rows = []
    for shape, slow in (("gate/up_proj", 1.0), ("down_proj", 1.5)):  # down_proj: ours 1.5x slower
        rows += [
            row(shape, 1, "ours uniform", 4, 10 * slow, pct_peak=70 / slow),
            row(shape, 1, "tinygemm int4 (aten)", 4, 13),
            row(shape, 1, "ours uniform", 3, 9 * slow),
            row(shape, 1, "ours lut", 4, 10 * slow),
            row(shape, 16, "ours uniform", 4, 5, speedup=2.6),
        ]
    status = {t["target"]: t for t in bench.targets(rows)}
    tinygemm = status["4-bit M=1 >= 1.2x tinygemm"]
    assert tinygemm["status"] == "missed" and tinygemm["worst"] == pytest.approx(13 / 15) and tinygemm["shapes"] == 2
    assert status["4-bit M=1 >= 60% of peak bandwidth (gate/up, down_proj)"]["worst"] == pytest.approx(70 / 1.5)
    assert status["4-bit M=16 >= 2.5x fp16"]["status"] == "met"
    assert status["3-bit M=1 faster than our 4-bit"]["status"] == "met"
    assert status["LUT-4 M=1 at least as fast as our 4-bit"]["status"] == "met"  # equal time is enough
    assert status["4-bit M=1 >= 1.2x gemlite"]["status"] == "unmeasured"
    assert status["4-bit M=64 >= 1.2x fp16"]["status"] == "unmeasured"


def test_memory_floor_is_the_bytes_a_kernel_must_move(weights):
    """The floor uses the packed weight as the kernels read it: for 4-bit group-128 symmetric at
    M = 1 the fp16/4-bit byte ratio is the ideal speedup 16 / (4 + 16/128) = 3.88 (Marlin's 3.87x),
    and 3-bit planes move exactly 3/4 of 4-bit's code bytes."""
    from compressor.kernels import prepare

    bench = load_benchmark()
    n, k = 512, 4096
    four, three = (prepare(weights.uniform(n, k, b, 128, device="cpu"))[0] for b in (4, 3))
    assert four.nbytes() == n * k // 2 + n * (k // 128) * 2  # codes + fp16 scales, no padding
    assert n * k * 2 / four.nbytes() == pytest.approx(16 / (4 + 16 / 128))
    assert bench.bytes_moved(four.nbytes(), 3, n, k) - four.nbytes() == 3 * (k + n) * 2  # x in, y out
    assert three.packed.numel() * 4 == pytest.approx(0.75 * four.packed.numel() * 4)
    assert bench.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert bench.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12  # not the SXM figure
    assert bench.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert bench.peak_bandwidth("NVIDIA GeForce RTX 4090") is None  # unknown: the measured copy bandwidth is used
