"""Kernel benchmark: our low-bit kernels against fp16 cuBLAS, torch's int4 tinygemm, gemlite and the
memory-bandwidth floor, on Llama-3 layer shapes (kernels.md section 9).

    python benchmarks/kernel_speed.py --device-check # GPU, at most ~6 minutes: the rows that decide issue 19's targets
    python benchmarks/kernel_speed.py                # GPU: Llama-3-8B and 70B shapes, M 1..128, all widths
    python benchmarks/kernel_speed.py --shapes 8b --m 1,16 --bits 4 --lut 4 --tune --max-seconds 120
    python benchmarks/kernel_speed.py --quick        # GPU: a few shapes; CPU: interpreter smoke run

Every row reports the median time, the bytes a kernel must move (packed weight + metadata +
activations + output), the bandwidth that implies, its share of the device's peak, the time
floor = bytes / peak bandwidth, the speedup over fp16 and the kernel's max error relative to the
fp32 reference. Rows are written as they finish (``<stem>.jsonl`` and ``<stem>.md`` after every
row), so a run cut short (``--max-seconds``, or a device call's time limit) keeps what it has;
``.json`` and a ``.png`` plot follow at the end. The table is headed by the date, device,
versions, command and the issue-19 targets (met / missed / unmeasured).

``--device-check``: the four 8B shapes; M = 1, 16, 64, 256; uniform 4/3/2/8-bit and LUT 4/3; fp16,
tinygemm int4 and gemlite (when installed) beside them; ours tuned (bounded) on the rows that
decide the targets, with the winners written as a kernel-config table (``--tune-out``, default
``<stem>-configs.json``) to merge into ``compressor/kernels/configs/``; stops cleanly after
``--max-seconds`` (default 330). Needs only torch, triton and ``pip install -e .``.

On a machine without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set
below before anything imports triton) on small shapes: that proves the benchmark runs and the
kernels are correct, and its timings mean nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import triton  # noqa: E402

from compressor.kernels import exact_linear, triton_linear  # noqa: E402
from compressor.kernels.tune import time_ms  # noqa: E402
from compressor.weights.values import LUTWeight, UniformWeight  # noqa: E402

SHAPES = {  # (name, N, K): the linear layers of one decoder block
    "8b": [
        ("q/o_proj", 4096, 4096),
        ("k/v_proj", 1024, 4096),
        ("gate/up_proj", 14336, 4096),
        ("down_proj", 4096, 14336),
    ],
    "70b": [
        ("q/o_proj", 8192, 8192),
        ("k/v_proj", 1024, 8192),
        ("gate/up_proj", 28672, 8192),
        ("down_proj", 8192, 28672),
    ],
    "cpu": [("small", 96, 256), ("odd", 37, 200)],
}
PEAK_BANDWIDTH = {"H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s, spec sheets
CPU_NOTE = (
    "CPU run under the Triton interpreter (TRITON_INTERPRET=1): this proves the benchmark runs and the "
    "kernels match the reference; the timings mean nothing and no GPU numbers exist yet."
)


def peak_bandwidth(device_name: str) -> float | None:
    for key, value in PEAK_BANDWIDTH.items():  # "H100 PCIe" before "H100"
        if key in device_name:
            return value
    return None


def measured_copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def time_us(fn, on_gpu: bool, small_m: bool) -> float:
    """Median microseconds: CUDA graphs for small M (launch overhead would dominate), else do_bench."""
    if on_gpu:
        fn()  # compile / autotune outside the measurement
        if small_m:
            try:
                return 1e3 * triton.testing.do_bench_cudagraph(fn, return_mode="median")
            except Exception:  # not capturable: fall back to plain launches
                pass
        return 1e3 * triton.testing.do_bench(fn, return_mode="median")
    fn()
    return 1e3 * time_ms(fn, on_gpu=False)  # the tuner's wall-clock median


def random_uniform(n, k, bits, group, device, dtype=torch.float16) -> UniformWeight:
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, device=device)
    groups = 1 if group == -1 else -(-k // group)
    scales = (torch.rand(n, groups, device=device) * 0.02 + 0.001).to(dtype)
    return UniformWeight(codes=codes, scales=scales, zeros=None, bits=bits, group_size=group)


def random_lut(n, k, bits, device, dtype=torch.float16) -> LUTWeight:
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, device=device)
    lut = torch.sort(torch.randn(n, 2**bits, device=device) * 0.02, dim=1).values.to(dtype)
    return LUTWeight(codes=codes, lut=lut, bits=bits)


def max_rel_error(y: torch.Tensor, expected: torch.Tensor) -> float:
    return ((y.float() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------
# baselines


def tinygemm_fn(weight: UniformWeight, x: torch.Tensor):
    """torch's int4 tinygemm (what torchao's int4 weight-only uses): (fn, error vs reference).

    ``w = (u - 8) * s + z`` with a float zero z; symmetric weights have z = 0. The CUDA op takes
    two codes per byte whose nibble order is not documented; both orders are tried and the one
    that reproduces the reference is kept.
    """
    n, k = weight.shape
    x16 = x.to(torch.bfloat16)
    scales = weight.scales.to(torch.bfloat16)
    zero = (8 - weight.zero_points()).to(torch.bfloat16) * scales
    scales_and_zeros = torch.stack([scales, zero], dim=-1).transpose(0, 1).contiguous()  # [G, N, 2]
    expected = exact_linear(x16, weight)
    codes = weight.codes
    if not x.is_cuda:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        fn = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x16, packed, weight.group_size, scales_and_zeros)  # noqa: E731
        return fn, max_rel_error(fn(), expected)
    best = None
    for high_first in (True, False):
        pairs = (codes[:, 0::2] << 4 | codes[:, 1::2]) if high_first else (codes[:, 1::2] << 4 | codes[:, 0::2])
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs.to(torch.uint8).contiguous(), 8)
        fn = lambda packed=packed: torch.ops.aten._weight_int4pack_mm(x16, packed, weight.group_size, scales_and_zeros)  # noqa: E731
        error = max_rel_error(fn(), expected)
        if best is None or error < best[1]:
            best = (fn, error)
    return best


def torchao_fn(weight: UniformWeight, x: torch.Tensor):
    """torchao's Int4WeightOnlyConfig on an nn.Linear holding our dequantized weight."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    n, k = weight.shape
    linear = torch.nn.Linear(k, n, bias=False, device=x.device, dtype=torch.bfloat16)
    linear.weight.data = weight.dequantize(torch.bfloat16)
    quantize_(linear, Int4WeightOnlyConfig(group_size=weight.group_size))
    x16 = x.to(torch.bfloat16)
    fn = lambda: linear(x16)  # noqa: E731
    return fn, max_rel_error(fn(), exact_linear(x16, weight))


def gemlite_fn(weight: UniformWeight, x: torch.Tensor):
    """gemlite's GemLiteLinear (1/2/4/8-bit), dequantizing (u - z) * s like ours."""
    from gemlite.core import DType, GemLiteLinear

    n, k = weight.shape
    layer = GemLiteLinear(
        weight.bits,
        group_size=weight.group_size,
        in_features=k,
        out_features=n,
        input_dtype=DType.FP16,
        output_dtype=DType.FP16,
    )
    layer.pack(weight.codes, weight.scales.half(), weight.zero_points().half(), None)
    x16 = x.half()
    fn = lambda: layer(x16)  # noqa: E731
    return fn, max_rel_error(fn(), exact_linear(x16, weight))


# --------------------------------------------------------------------------------------------
# the sweep


class StopBenchmark(Exception):
    """--max-seconds reached: stop cleanly with the rows measured so far."""


def bytes_moved(weight_bytes: int, m: int, n: int, k: int) -> int:
    """What one call must move at least: the weight as stored, x in and y out in fp16."""
    return weight_bytes + m * k * 2 + m * n * 2


class Recorder:
    """Keeps the rows and writes them to disk as each one finishes (``.jsonl`` appended, ``.md`` redrawn)."""

    def __init__(self, stem: Path, meta: dict):
        self.stem, self.meta, self.rows = stem, meta, []
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".jsonl").write_text("")

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with self.stem.with_suffix(".jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.stem.with_suffix(".md").write_text(markdown(self.rows, self.meta))


def shape_order(args) -> list:
    """(M, shape) pairs, M outer: a run cut short has every shape at the small M that matter most."""
    shapes = [s for key in args.shapes for s in SHAPES[key]]
    return [(m, shape) for m in args.m for shape in shapes]


def should_tune(args, kind: str, bits: int, m: int) -> bool:
    if not args.tune:
        return False
    if not args.device_check:
        return True
    return (kind, bits) == ("uniform", 4) or (
        (kind, bits) in (("uniform", 3), ("lut", 4)) and m == 1
    )  # the target rows


def run(args, stem: Path | None = None) -> tuple[list[dict], dict]:
    from compressor.kernels import dispatch, tables, tune
    from compressor.kernels.codes import dequant_affine
    from compressor.kernels.dequant import dequantize_weight
    from compressor.kernels.heuristics import candidate_configs, codebook_config, default_config
    from compressor.kernels.packing import pack_codes
    from compressor.kernels.uniform import uniform_linear

    start = time.monotonic()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()})"
    peak = peak_bandwidth(device_name) if on_gpu else None
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name,
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]) if args.command is None else args.command,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "peak_bandwidth": peak,
        "interpreter": not on_gpu,
        "group_size": args.group,
        "max_seconds": args.max_seconds,
        "stopped": None,
    }
    if on_gpu:
        meta["copy_bandwidth"] = measured_copy_bandwidth()
        peak = peak or meta["copy_bandwidth"]
    stem = stem or Path(args.out) / "kernels"
    recorder = Recorder(stem, meta)
    tuned_entries: dict = {}

    def check_time():
        if args.max_seconds is not None and time.monotonic() - start > args.max_seconds:
            raise StopBenchmark

    weights_by_shape: dict = {}

    def weights_for(n, k):
        if (n, k) not in weights_by_shape:
            dense = (torch.randn(n, k, device=device) * 0.02).half()
            weights = [("uniform", b, random_uniform(n, k, b, args.group, device)) for b in args.bits]
            weights += [("lut", b, random_lut(n, k, b, device)) for b in args.lut]
            weights.sort(
                key=lambda item: (item[:2] != ("uniform", 4), item[0] != "uniform" or item[1] != 3)
            )  # target rows first
            weights_by_shape[(n, k)] = dense, weights
        return weights_by_shape[(n, k)]

    try:
        for m, (shape_name, n, k) in shape_order(args):
            dense, weights = weights_for(n, k)
            x = torch.randn(m, k, device=device).half()
            small = m <= 16
            here = []

            def add(kernel, bits, fn, weight_bytes, error=None, note="", config=None, moved=None):
                check_time()
                row = {"shape": shape_name, "N": n, "K": k, "M": m, "kernel": kernel, "bits": bits, "note": note}
                if config is not None:
                    row["config"] = config.as_dict()
                try:
                    row["us"] = time_us(fn, on_gpu, small)
                except Exception as exc:  # a baseline that cannot run here is a row with a reason, not a crash
                    row.update(us=None, note=f"{type(exc).__name__}: {str(exc)[:120]}")
                    here.append(row)
                    recorder.add(row)
                    return
                moved = moved or bytes_moved(weight_bytes, m, n, k)
                row.update(bytes=moved, max_rel_err=error)
                if peak:
                    row.update(
                        gbps=moved / (row["us"] * 1e-6) / 1e9,
                        pct_peak=100 * moved / (row["us"] * 1e-6) / peak,
                        floor_us=moved / peak * 1e6,
                    )
                baseline = row["us"] if bits == 16 else next((r.get("us") for r in here if r["bits"] == 16), None)
                if baseline and row.get("us"):
                    row["speedup"] = baseline / row["us"]
                here.append(row)
                recorder.add(row)

            def failed(kernel, bits, exc):
                row = {
                    "shape": shape_name,
                    "N": n,
                    "K": k,
                    "M": m,
                    "kernel": kernel,
                    "bits": bits,
                    "us": None,
                    "note": f"{type(exc).__name__}: {str(exc)[:120]}",
                }
                here.append(row)
                recorder.add(row)

            if on_gpu:
                fp16 = lambda: torch.nn.functional.linear(x, dense)  # noqa: E731
            else:  # CPU fp16 matmuls are emulated: compare with fp32 there
                fp16 = lambda: torch.nn.functional.linear(x.float(), dense.float())  # noqa: E731
            add("fp16 (cuBLAS)" if on_gpu else "fp32 torch (CPU)", 16, fp16, n * k * 2)
            for kind, bits, weight in weights:
                dense_part, _ = dispatch.prepare(weight)
                group = args.group if kind == "uniform" else -1
                config = (dispatch.table_config(dense_part, m, device_name) if on_gpu else None) or default_config(
                    m, n, k, group, device, bits
                )
                if kind == "lut" and dense_part.log_np and config.lut == "global":  # the heuristic's codebook path
                    config = codebook_config(config, bits)
                note = "table" if on_gpu and dispatch.table_config(dense_part, m, device_name) else "heuristic"
                if should_tune(args, kind, bits, m):
                    candidates = [config] + [
                        c for c in candidate_configs(m, n, k, group, device, bits, lut=kind == "lut") if c != config
                    ]
                    candidates = candidates[: args.tune_candidates]
                    timings = []
                    for candidate in candidates:
                        check_time()
                        timings += tune.measure([candidate], lambda c: triton_linear(x, weight, None, c), on_gpu)
                    ok = [(ms, i, c) for i, (c, ms) in enumerate(timings) if ms is not None]
                    if ok:
                        best_ms, _, config = min(ok)
                        note = f"tuned ({len(ok)} of {len(candidates)} candidates ran)"
                        tuned_entries[tables.table_key(kind, bits, group, n, k, m)] = {
                            **config.as_dict(),
                            "us": round(best_ms * 1e3, 2),
                            "source": f"benchmarks/kernel_speed.py --tune on {device_name}, {meta['date'][:10]}",
                        }
                error = max_rel_error(triton_linear(x, weight, None, config), exact_linear(x, weight))
                add(
                    f"ours {kind}",
                    bits,
                    lambda weight=weight, config=config: triton_linear(x, weight, None, config),
                    dense_part.nbytes(),
                    error,
                    note,
                    config,
                )
                if m <= 4 and (kind, bits) == ("uniform", 3) and dense_part.layout == "tens":  # the layout it replaced
                    planes = dataclasses.replace(dense_part, packed=pack_codes(weight.codes, 3), layout="planes")
                    add(
                        f"ours {kind} (3-bit planes)",
                        bits,
                        lambda planes=planes, config=config: uniform_linear(x, planes, None, config),
                        planes.nbytes(),
                        max_rel_error(uniform_linear(x, planes, None, config), exact_linear(x, weight)),
                        "the planes layout, same config",
                        config,
                    )
                if m > 16 and (kind, bits) == ("uniform", 4):  # prefill: both ways, so the table can pick
                    for other in ("gemm", "dequant"):
                        if config.schedule == other:
                            continue
                        forced = next(c for c in candidate_configs(m, n, k, group, device, bits) if c.schedule == other)
                        add(
                            f"ours {kind} ({other})",
                            bits,
                            lambda weight=weight, forced=forced: triton_linear(x, weight, None, forced),
                            dense_part.nbytes(),
                            None,
                            "forced schedule",
                            forced,
                        )
                    if m == next(v for v in args.m if v > 16):  # the dequantize pass alone: read packed, write fp16
                        dequant = next(
                            c for c in candidate_configs(m, n, k, group, device, bits) if c.schedule == "dequant"
                        )
                        add(
                            "ours dequantize kernel",
                            bits,
                            lambda dense_part=dense_part, dequant=dequant: dequantize_weight(
                                dense_part.packed,
                                dense_part.rows_per_bit,
                                dense_part.shape,
                                bits,
                                dense_part.scales,
                                dense_part.zs,
                                group,
                                dequant_affine,
                                torch.float16,
                                dequant,
                                kn=True,
                            ),
                            dense_part.nbytes(),
                            None,
                            "W [K, N] fp16 only, no matmul",
                            dequant,
                            moved=dense_part.nbytes() + n * k * 2,
                        )
            four_bit = next((w for kind, b, w in weights if kind == "uniform" and b == 4), None)
            if four_bit is not None and args.group in (32, 64, 128, 256):
                baselines = [("tinygemm int4 (aten)", tinygemm_fn)]
                if on_gpu and importlib.util.find_spec("torchao"):
                    baselines.append(("torchao Int4WeightOnly", torchao_fn))
                for name, make in baselines:
                    check_time()
                    try:
                        fn, error = make(four_bit, x)
                    except Exception as exc:
                        failed(name, 4, exc)
                        continue
                    add(name, 4, fn, n * k // 2 + four_bit.scales.numel() * 4, error)
            if on_gpu and importlib.util.find_spec("gemlite"):
                for kind, bits, weight in weights:
                    if kind != "uniform" or bits not in (1, 2, 4, 8):
                        continue
                    check_time()
                    try:
                        fn, error = gemlite_fn(weight, x)
                    except Exception as exc:
                        failed("gemlite", bits, exc)
                        continue
                    add("gemlite", bits, fn, n * k * bits // 8 + weight.scales.numel() * 4, error)
            print(f"{shape_name} {n}x{k} M={m}: done ({time.monotonic() - start:.0f} s)", file=sys.stderr)
    except StopBenchmark:
        meta["stopped"] = f"--max-seconds {args.max_seconds} reached after {len(recorder.rows)} rows"
        print(meta["stopped"], file=sys.stderr)
    meta["seconds"] = round(time.monotonic() - start, 1)
    if tuned_entries:
        out = Path(args.tune_out) if args.tune_out else stem.parent / f"{stem.name}-configs.json"
        tables.write_table(
            out, tuned_entries, device_name, f"benchmarks/kernel_speed.py --tune: {meta['command']}", merge=False
        )
        meta["tuned_table"] = str(out)
    return recorder.rows, meta


# --------------------------------------------------------------------------------------------
# issue 19's targets, read off the rows

TARGETS = [  # (what, kind of check) -- ratios from one run, 8B shapes
    ("4-bit M=1 >= 1.2x tinygemm", "vs_tinygemm"),
    ("4-bit M=1 >= 1.2x gemlite", "vs_gemlite"),
    ("4-bit M=1 >= 60% of peak bandwidth (gate/up, down_proj)", "pct_peak"),
    ("4-bit M=16 >= 2.5x fp16", "m16"),
    ("4-bit M=64 >= 1.2x fp16", "m64"),
    ("4-bit M=256 >= 1.0x fp16", "m256"),
    ("3-bit M=1 faster than our 4-bit", "w3"),
    ("LUT-4 M=1 at least as fast as our 4-bit", "lut4"),
]


def targets(rows: list[dict]) -> list[dict]:
    """Each target: the worst value over the shapes measured, the threshold, and met / missed /
    unmeasured (no row for it, e.g. no GPU, no gemlite, or the run was cut short)."""

    def find(shape, m, kernel, bits):
        return next(
            (
                r
                for r in rows
                if (r["shape"], r["M"], r["kernel"], r["bits"]) == (shape, m, kernel, bits) and r.get("us")
            ),
            None,
        )

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    results = []
    for what, check in TARGETS:
        values = []
        for shape in shapes:
            ours4 = find(shape, 1, "ours uniform", 4)
            if check in ("vs_tinygemm", "vs_gemlite"):
                other = find(shape, 1, "tinygemm int4 (aten)" if check == "vs_tinygemm" else "gemlite", 4)
                if ours4 and other:
                    values.append(other["us"] / ours4["us"])
            elif check == "pct_peak":
                if shape in ("gate/up_proj", "down_proj") and ours4 and ours4.get("pct_peak") is not None:
                    values.append(ours4["pct_peak"])
            elif check in ("m16", "m64", "m256"):
                row = find(shape, int(check[1:]), "ours uniform", 4)
                if row and row.get("speedup"):
                    values.append(row["speedup"])
            else:
                other = find(shape, 1, "ours uniform", 3) if check == "w3" else find(shape, 1, "ours lut", 4)
                if ours4 and other:
                    values.append(ours4["us"] / other["us"])
        threshold = {
            "vs_tinygemm": 1.2,
            "vs_gemlite": 1.2,
            "pct_peak": 60.0,
            "m16": 2.5,
            "m64": 1.2,
            "m256": 1.0,
            "w3": 1.0,
            "lut4": 1.0,
        }[check]
        worst = min(values) if values else None
        if worst is None:
            status = "unmeasured"
        elif check == "w3":
            status = "met" if worst > threshold else "missed"
        else:
            status = "met" if worst >= threshold else "missed"
        results.append(
            {"target": what, "worst": worst, "threshold": threshold, "shapes": len(values), "status": status}
        )
    return results


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Kernel benchmark, {meta['date']}",
        "",
        f"- device: {meta['device']}",
        f"- command: `{meta['command']}`",
        f"- torch {meta['torch']}, triton {meta['triton']}, uniform group size {meta['group_size']} (symmetric)",
    ]
    if meta.get("peak_bandwidth"):
        lines.append(
            f"- peak bandwidth {meta['peak_bandwidth'] / 1e12:.2f} TB/s (spec sheet); "
            f"measured copy {meta.get('copy_bandwidth', 0) / 1e12:.2f} TB/s"
        )
    if meta.get("stopped"):
        lines.append(f"- **stopped early**: {meta['stopped']}")
    if meta.get("tuned_table"):
        lines.append(f"- tuned configs written to `{meta['tuned_table']}`")
    if meta["interpreter"]:
        lines += ["", f"**{CPU_NOTE}**"]
    lines += ["", "| target (issue 19) | worst over shapes | threshold | shapes | status |", "|---|---|---|---|---|"]
    for t in targets(rows):
        worst = "" if t["worst"] is None else f"{t['worst']:.2f}"
        lines.append(f"| {t['target']} | {worst} | {t['threshold']} | {t['shapes']} | {t['status']} |")
    lines += [
        "",
        "| shape | N x K | M | kernel | bits | time (us) | GB/s | % peak | floor (us) | x fp16 | max rel err | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['N']}x{r['K']} | {r['M']} | {r['kernel']} | {r['bits']} | "
            f"{fmt(r.get('us'), '.1f')} | "
            f"{fmt(r.get('gbps'), '.0f')} | {fmt(r.get('pct_peak'), '.0f')} | {fmt(r.get('floor_us'), '.1f')} | "
            f"{fmt(r.get('speedup'), '.2f')} | {fmt(r.get('max_rel_err'), '.1e')} | {r.get('note', '')} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], meta: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shapes = list(dict.fromkeys((r["shape"], r["N"], r["K"]) for r in rows))
    if not shapes:
        return False
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 4), squeeze=False)
    for ax, (name, n, k) in zip(axes[0], shapes):
        mine = [r for r in rows if (r["shape"], r["N"], r["K"]) == (name, n, k) and r.get("speedup")]
        for label in dict.fromkeys((r["kernel"], r["bits"]) for r in mine):
            series = sorted((r["M"], r["speedup"]) for r in mine if (r["kernel"], r["bits"]) == label)
            ax.plot(*zip(*series), marker="o", label=f"{label[0]} {label[1]}b")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{name} {n}x{k}")
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speedup over fp16")
        ax.set_yscale("log")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(
        f"{meta['device']} {meta['date']}" + (" - interpreter, timings meaningless" if meta["interpreter"] else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731
    parser.add_argument(
        "--shapes", default=None, help="comma list of 8b, 70b, cpu (default: 8b,70b on GPU, cpu on CPU)"
    )
    parser.add_argument("--m", type=ints, default=None, help="batch sizes (default 1,2,4,8,16,32,64,128)")
    parser.add_argument("--bits", type=ints, default=None, help="uniform widths (default 2..8)")
    parser.add_argument("--lut", type=ints, default=None, help="LUT widths (default 4,3)")
    parser.add_argument("--group", type=int, default=128, help="uniform group size (default 128)")
    parser.add_argument("--quick", action="store_true", help="GPU: 8B shapes, M 1,16,64, 3/4-bit; CPU: tiny shapes")
    parser.add_argument(
        "--device-check",
        action="store_true",
        help="the rows that decide issue 19's targets, tuned, within --max-seconds (default 330)",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=None, help="stop cleanly after this long, keeping every finished row"
    )
    parser.add_argument(
        "--tune", action="store_true", help="tune our kernels per row (bounded candidates) and write the winners"
    )
    parser.add_argument(
        "--tune-candidates",
        type=int,
        default=None,
        help="at most this many configs per tuned row (default 8; 6 with --device-check)",
    )
    parser.add_argument(
        "--tune-out", default=None, help="kernel-config table for the tuned winners (default <stem>-configs.json)"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output folder")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--command", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if args.device_check:
        args.shapes = args.shapes or ("8b" if on_gpu else "cpu")
        args.m = args.m or [1, 16, 64, 256]
        args.bits = args.bits or [4, 3, 2, 8]
        args.lut = args.lut if args.lut is not None else [4, 3]
        args.max_seconds = 330.0 if args.max_seconds is None else args.max_seconds
        args.tune = True
        args.tune_candidates = args.tune_candidates or 6
    args.tune_candidates = args.tune_candidates or 8
    quick = args.quick or not on_gpu
    args.shapes = (
        args.shapes.split(",")
        if args.shapes
        else (["8b"] if on_gpu and quick else ["8b", "70b"] if on_gpu else ["cpu"])
    )
    args.m = args.m or ([1, 16, 64] if on_gpu and quick else [1, 2, 4, 8, 16, 32, 64, 128] if on_gpu else [1, 4, 17])
    args.bits = args.bits or ([3, 4] if on_gpu and quick else list(range(2, 9)))
    args.lut = args.lut if args.lut is not None else ([4] if on_gpu and quick else [4, 3])
    if not on_gpu:
        args.group = min(args.group, 64)
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()})"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    suffix = "-device-check" if args.device_check else ""
    stem = Path(args.out) / f"kernels-{datetime.date.today().isoformat()}-{slug}{suffix}"
    rows, meta = run(args, stem)
    text = markdown(rows, meta)
    if not args.no_plot and plot(rows, meta, stem.with_suffix(".png")):
        text += f"\n![speedup over fp16]({stem.with_suffix('.png').name})\n"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "targets": targets(rows)}, indent=1))
    print(text)
    print(f"wrote {stem}.md", file=sys.stderr)
    return stem.with_suffix(".md")


if __name__ == "__main__":
    main()
