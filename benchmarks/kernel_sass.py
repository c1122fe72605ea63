"""Instructions per weight in the K loop of our decode kernels, from their sm_90 SASS, on any machine.

At M = 1 a weight-only kernel should be bound by memory bandwidth, but each weight also costs
instructions (unpack, convert, multiply-add), and a GPU issues only so many: an H100 SXM issues
132 SMs x 4 schedulers x 32 lanes x 1.98 GHz = 3.3e13 thread-instructions/s, so at its 3.35 TB/s a
b-bit kernel has a budget of 3.3e13 / (3.35e12 * 8 / b) = ~1.25 b instructions per weight
(4-bit: 5.0, 3-bit: 3.8, 2-bit: 2.5, 8-bit: 10); an H200 (4.8 TB/s, same SMs) 30 % less. Above it,
the kernel cannot reach the bandwidth peak whatever its tiles.

This compiles variants for sm_90 (Triton's backend and ptxas run without a GPU; x contiguous and
N, K, pointers 16-divisible, as the JIT specializes them), disassembles them with the cuobjdump
Triton ships, finds the K loop (the innermost loop holding the multiply-adds) and divides its
instructions by the weights one thread handles per iteration. A static count: no latency, no
memory, no occupancy -- a floor check to run before a GPU is at hand.

    python benchmarks/kernel_sass.py            # one line per variant: count, budgets, verdict
    python benchmarks/kernel_sass.py --only tens

The budgets are for the codes' bytes alone (group metadata and the codebooks add a few percent).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.compiler import ASTSource
from triton.experimental.gluon import GluonASTSource
from triton.experimental.gluon._runtime import GluonJITFunction

from compressor.kernels.variants import TARGET, matmul_variant

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
VARIANTS = [  # (name, matmul_variant kwargs, rows, block_n, block_k)
    ("uniform 4b, 512x16, 4 warps", dict(bits=4, block=(1, 512, 16), num_warps=4, fields=False)),
    (
        "uniform 4b, 512x16, 4 warps, unroll 4",
        dict(bits=4, block=(1, 512, 16), num_warps=4, unroll=4, fields=False),
    ),
    ("uniform 4b, 128x16, 1 warp", dict(bits=4, block=(1, 128, 16), num_warps=1, num_stages=1, fields=False)),
    ("uniform 4b, 128x16, 4 warps", dict(bits=4, block=(1, 128, 16), num_warps=4, fields=False)),
    ("uniform 4b, 128x64, 4 warps", dict(bits=4, block=(1, 128, 64), num_warps=4, fields=False)),
    ("uniform 4b fields, 512x16, 4 warps", dict(bits=4, block=(1, 512, 16), num_warps=4)),
    ("uniform 4b fields, 512x16, 2 warps", dict(bits=4, block=(1, 512, 16), num_warps=2)),
    ("uniform 4b fields, 128x16, 1 warp", dict(bits=4, block=(1, 128, 16), num_warps=1)),
    ("uniform 4b fields, 512x16, 1 warp, unroll 2", dict(bits=4, block=(1, 512, 16), num_warps=1, unroll=2)),
    (
        "uniform 4b fields, 512x16, 1 warp, unroll 4 (spills 16 bytes)",
        dict(bits=4, block=(1, 512, 16), num_warps=1, unroll=4),
    ),
    ("uniform 2b fields, 512x16, 2 warps", dict(bits=2, block=(1, 512, 16), num_warps=2)),
    ("uniform 2b fields, 512x16, 1 warp", dict(bits=2, block=(1, 512, 16), num_warps=1)),
    ("uniform 2b fields, 512x16, 1 warp, unroll 4", dict(bits=2, block=(1, 512, 16), num_warps=1, unroll=4)),
    (
        "uniform 2b fields, 512x16, 1 warp, unroll 4, K tail masked",
        dict(bits=2, block=(1, 512, 16), num_warps=1, unroll=4, even_k=False),
    ),
    ("uniform 8b fields, 512x16, 2 warps", dict(bits=8, block=(1, 512, 16), num_warps=2)),
    ("uniform 8b fields, 512x16, 1 warp, unroll 2", dict(bits=8, block=(1, 512, 16), num_warps=1, unroll=2)),
    ("uniform 3b planes, 512x32, 4 warps", dict(bits=3, layout="planes", block=(1, 512, 32), num_warps=4)),
    (
        "uniform 3b planes, 512x32, 4 warps, unroll 4",
        dict(bits=3, layout="planes", block=(1, 512, 32), num_warps=4, unroll=4),
    ),
    ("uniform 3b tens, 512x32, 4 warps", dict(bits=3, layout="tens", block=(1, 512, 32), num_warps=4)),
    ("uniform 3b tens, 512x32, 2 warps", dict(bits=3, layout="tens", block=(1, 512, 32), num_warps=2)),
    ("uniform 3b tens, 512x32, 1 warp", dict(bits=3, layout="tens", block=(1, 512, 32), num_warps=1)),
    (
        "uniform 3b tens, 512x32, 1 warp, unroll 2 (spills 40 bytes)",
        dict(bits=3, layout="tens", block=(1, 512, 32), num_warps=1, unroll=2),
    ),
    (
        "uniform 3b tens, 512x32, 4 warps, unroll 4",
        dict(bits=3, layout="tens", block=(1, 512, 32), num_warps=4, unroll=4),
    ),
    ("uniform 3b tens, 512x64, 4 warps", dict(bits=3, layout="tens", block=(1, 512, 64), num_warps=4)),
    ("uniform 2b, 512x16, 4 warps", dict(bits=2, block=(1, 512, 16), num_warps=4, fields=False)),
    ("uniform 8b, 512x16, 4 warps", dict(bits=8, block=(1, 512, 16), num_warps=4, fields=False)),
    ("uniform 4b, M16 tensor cores, 64x64, 4 warps", dict(bits=4, block=(16, 64, 64), num_warps=4)),
    ("uniform 4b, M4 CUDA cores, 256x16, 2 warps", dict(bits=4, block=(4, 256, 16), num_warps=2, fields=False)),
    ("uniform 4b fields, M4 CUDA cores, 256x16, 2 warps", dict(bits=4, block=(4, 256, 16), num_warps=2)),
    ("lut 4b global, 512x16, 4 warps", dict(bits=4, lut=True, block=(1, 512, 16), num_warps=4)),
    (
        "lut 4b registers, 512x16, 4 warps",
        dict(bits=4, lut=True, lut_mode="registers", block=(1, 512, 16), num_warps=4),
    ),
    (
        "lut 4b codemajor, 512x16, 4 warps",
        dict(bits=4, lut=True, lut_mode="codemajor", block=(1, 512, 16), num_warps=4),
    ),
    (
        "lut 4b codemajor, 512x16, 2 warps (spills 28 bytes)",
        dict(bits=4, lut=True, lut_mode="codemajor", block=(1, 512, 16), num_warps=2),
    ),
    (
        "lut 4b shared (Gluon), 1024x16, 4 warps",
        dict(bits=4, lut=True, lut_mode="shared", block=(1, 1024, 16), num_warps=4),
    ),
    (
        "lut 4b shared (Gluon), 1024x16, 2 warps",
        dict(bits=4, lut=True, lut_mode="shared", block=(1, 1024, 16), num_warps=2),
    ),
    ("lut 3b global, 512x32, 4 warps", dict(bits=3, lut=True, block=(1, 512, 32), num_warps=4)),
]


def compile_variant(kernel, types_, constexprs, num_warps, num_stages):
    """The sm_90 compilation of a (Triton or Gluon) kernel variant."""
    constexprs = {**constexprs, "stride_xk": 1}
    signature = {
        n: "constexpr" if n in constexprs else types_[n] if n.endswith("_ptr") else "i32" for n in kernel.arg_names
    }
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(kernel.arg_names)
        if n not in constexprs and (n.endswith("_ptr") or n in ("N", "K", "NP", "rows_per_bit", "stride_xm"))
    }
    source = GluonASTSource if isinstance(kernel, GluonJITFunction) else ASTSource
    return triton.compile(
        source(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=TARGET,
        options={"num_warps": num_warps, "num_stages": num_stages},
    )


def disassemble(compiled) -> list[str]:
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        text = subprocess.run([str(CUOBJDUMP), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    return [line for line in text.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]


def sass(kernel, types_, constexprs, num_warps, num_stages) -> list[str]:
    return disassemble(compile_variant(kernel, types_, constexprs, num_warps, num_stages))


def opcode(line: str) -> str:
    return re.sub(r"^\s+/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?", "", line).split()[0].split(".")[0]


def k_loop(lines: list[str]) -> list[str]:
    """The innermost backward-branch loop holding the most FFMA/FMUL/HMMA (the K loop, not the epilogue's)."""
    address = [int(re.match(r"\s+/\*([0-9a-f]+)\*/", line).group(1), 16) for line in lines]
    best, best_key = [], None
    for i, line in enumerate(lines):
        target = re.search(r"BRA (0x[0-9a-f]+)", line)
        if not target or int(target.group(1), 16) >= address[i]:
            continue
        body = [text for text, a in zip(lines, address) if int(target.group(1), 16) <= a <= address[i]]
        key = (-sum(opcode(text) in ("FFMA", "FMUL", "HMMA") for text in body), len(body))
        if key[0] < 0 and (best_key is None or key < best_key):
            best, best_key = body, key
    return best


ISSUE = 132 * 4 * 32 * 1.98e9  # thread-instructions/s of an H100 SXM (and an H200: the same SMs and clock)
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s


def budget(bits: int, device: str = "H100") -> float:
    """Instructions per weight a ``bits``-wide decode may issue before issue, not memory, sets the pace."""
    return ISSUE / (BANDWIDTH[device] * 8 / bits)


def per_weight(name: str, options: dict) -> str:
    options = {"split_k": 8, "epilogue": 1, **options}
    kernel, types_, constexprs, warps, stages = matmul_variant("decode", "fp16", **options)
    compiled = compile_variant(kernel, types_, constexprs, warps, stages)
    body = k_loop(disassemble(compiled))
    rows, block_n, block_k = options["block"]
    weights_per_thread = block_n * block_k / (32 * warps)
    products = sum(opcode(line) == "FFMA" for line in body) / (rows if rows < 16 else 1)
    tiles = 1 if rows >= 16 else max(1, round(products / weights_per_thread))  # unrolled tiles in the body
    counts: dict[str, int] = {}
    for line in body:
        counts[opcode(line)] = counts.get(opcode(line), 0) + 1
    top = ", ".join(
        f"{op} {n / (weights_per_thread * tiles):.2f}" for op, n in sorted(counts.items(), key=lambda kv: -kv[1])[:6]
    )
    count = len(body) / (weights_per_thread * tiles)
    h100, h200 = budget(options["bits"]), budget(options["bits"], "H200")
    verdict = "within" if count <= h100 else "OVER"
    shared = f"; shared memory {compiled.metadata.shared} bytes" if isinstance(kernel, GluonJITFunction) else ""
    return (
        f"{name}: {count:.2f} instructions per weight, budget {h100:.2f} H100 / {h200:.2f} H200: "
        f"{verdict} the H100 budget ({top}){shared}"
    )


def main(argv=None):
    """``--only TEXT`` keeps the variants whose name contains TEXT."""
    argv = sys.argv[1:] if argv is None else argv
    only = argv[argv.index("--only") + 1] if "--only" in argv else ""
    for name, options in VARIANTS:
        if only not in name:
            continue
        try:
            print(per_weight(name, options), flush=True)
        except Exception as exc:  # report and go on
            print(f"{name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    main()
