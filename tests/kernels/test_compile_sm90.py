"""Every kernel family compiles for an H100 (sm_90) down to a cubin, on this machine, GPU or not.

The interpreter checks what the kernels compute; this checks that the compiler accepts them (types,
tl.dot shapes, constexpr branches, shared memory within the H100's 227 KB) and that the tiled
fp16/bf16 gemm gets Hopper's wgmma tensor-core instructions.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

H100_MAX_SHARED = 232448  # bytes of shared memory per block (227 KB, opt-in)


@pytest.fixture(scope="module")
def compiled():
    script = Path(__file__).with_name("sm90_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert rows, done.stderr[-3000:]
    return {row["name"]: row for row in rows}


def test_every_variant_compiles_within_h100_shared_memory(compiled):
    errors = {name: row["error"] for name, row in compiled.items() if "error" in row}
    assert not errors, errors
    assert len(compiled) >= 10
    assert all(row["shared"] <= H100_MAX_SHARED for row in compiled.values())


def test_tiled_half_precision_gemm_uses_wgmma(compiled):
    tiled = [row for name, row in compiled.items() if name.startswith("gemm") and "tiled" in name]
    assert tiled and all(row["wgmma"] for row in tiled)
    assert not any(row["wgmma"] for name, row in compiled.items() if name.startswith("decode M1"))


def test_the_shipped_decode_configs_fit_in_registers(compiled):
    """Decode is memory-bound: resident warps keep loads in flight. Every decode config the shipped
    Hopper table gives the 8B shapes compiles without spills, and in at most 168 registers per
    thread (at least 12 warps on an SM, 65536 registers) -- except the 2-bit field decode at M = 1
    (sixteen columns and four K-tiles per thread: ~217), whose warps each keep 8 KB of code words in
    flight, so the 9 that fit hold ~72 KB per SM, more than the ~30 KB that an H200's bandwidth x
    latency needs per SM (4.8 TB/s x ~0.8 us / 132)."""
    table = {name: row for name, row in compiled.items() if name.startswith("table decode")}
    assert len(table) >= 6
    assert all(row["spill_bytes"] == 0 for row in table.values()), table
    assert all(row["registers"] <= (232 if " 2b " in name else 168) for name, row in table.items()), table


def sass_counts(only: str) -> dict:
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)  # this checkout's kernels
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "kernel_sass.py"), "--only", only],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    counts = dict(re.findall(r"^(.*?): ([\d.]+) instructions per weight, budget", done.stdout, re.M))
    assert counts, done.stdout + done.stderr[-2000:]
    budgets = dict(re.findall(r"^(.*?): [\d.]+ instructions per weight, budget ([\d.]+)", done.stdout, re.M))
    return {name: (float(count), float(budgets[name])) for name, count in counts.items()}


def test_three_bit_tens_decode_is_within_its_budget():
    """The "tens" layout's decode (one AND and one FMA per field, eight columns per thread), counted
    in its sm_90 SASS, stays under the 3-bit budget of ~3.75 instructions per weight (the planes
    layout took 8.4)."""
    ((count, budget),) = sass_counts("uniform 3b tens, 512x32, 2 warps").values()
    assert count <= budget < 3.8


def test_uniform_decode_stays_within_the_h100_instruction_budget():
    """At the H100's 3.35 TB/s a 4-bit kernel may issue ~5 instructions per weight before issue,
    not memory, sets the pace (benchmarks/kernel_sass.py). The uniform 4-bit decode K loop, counted
    in its sm_90 SASS, stays near it: the first version took 8.5-11 (one load per code, I2F, a
    zero subtracted and a scale multiplied per weight), and a change that brings any of that back
    shows here."""
    root = Path(__file__).resolve().parents[2]
    script = root / "benchmarks" / "kernel_sass.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)  # this checkout's kernels
    done = subprocess.run(
        [sys.executable, str(script), "--only", "uniform 4b, 512x16"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    counts = dict(re.findall(r"^(.*?): ([\d.]+) instructions per weight", done.stdout, re.M))
    assert len(counts) == 2, done.stdout + done.stderr[-2000:]
    assert float(counts["uniform 4b, 512x16, 4 warps"]) < 6.5
    assert float(counts["uniform 4b, 512x16, 4 warps, unroll 4"]) < 5.5


def test_two_bit_decode_is_within_its_budget():
    """Issue 31: the 2-bit field decode at M = 1 as the heuristic runs it (sixteen columns per thread,
    four K-tiles per group-scale step, unmasked x), counted in its sm_90 SASS, stays under the 2-bit
    budget of ~2.5 instructions per weight (eight columns per thread and one tile per step: 3.4)."""
    name = "uniform 2b fields, 512x16, 1 warp, unroll 4"
    count, budget = sass_counts(name)[name]
    assert count <= budget < 2.6


def test_shared_memory_codebook_decode_is_within_its_budget_and_owns_its_shared_memory():
    """Issue 31: the Gluon LUT-4 decode (codebooks in shared memory, one LOP3, one IMAD/LEA, one LDS
    and one FMA per weight) stays under the 4-bit budget of ~5 (the global code-major table: 7.6),
    and its only shared allocation is the [16, 1024] fp32 table, which is what lets its inline PTX
    address the table from ``global_smem`` (offset 0)."""
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "kernel_sass.py"), "--only", "lut 4b shared"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = re.search(r"^lut 4b shared \(Gluon\), 1024x16, 4 warps.*$", done.stdout, re.M)
    assert line, done.stdout + done.stderr[-2000:]
    count, budget = map(float, re.search(r": ([\d.]+) instructions per weight, budget ([\d.]+)", line[0]).groups())
    assert count <= budget < 5.0
    assert re.search(r"shared memory (\d+) bytes", line[0])[1] == str(16 * 1024 * 4)
