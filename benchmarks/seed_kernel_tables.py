"""Write the seed of the shipped Hopper kernel-config table, ``compressor/kernels/configs/hopper.json``.

The seed is what can be said without a GPU at hand, each entry saying where it came from:

* every key: the heuristic ``heuristics.gpu_config`` for an H100-sized GPU (132 SMs; codebooks with
  ``heuristics.codebook_config``, the code-major table at decode on CUDA cores): the
  one-launch decode kernel up to M = 16 (BLOCK_N and the serial split-K sized so that about two
  programs run per SM while the fp32 partials stay small), the fused gemm below M = 64, and
  dequantize + cuBLAS from M = 64 (the H200 run of 2026-11-27 measured the fused tiles at
  0.1-0.5x fp16 there, while one dequantize pass plus cuBLAS costs about fp16's time plus a
  write of the fp16 weight);
* 4-bit group-128 at M = 1 on the Llama-3-8B shapes: the tile width and stages of gemlite's
  published Hopper winners (mobiusml/gemlite ``gemlite/configs/h100.json``, ``GEMV_REVSPLITK``
  keys ``(1, N, K, 128, 8)``; our warps and unroll: up to sixteen columns per thread and four K-tiles per
  group-scale application, as the field decode counts best), with
  our split-K rule (gemlite splits K into 16-32 element chunks
  and adds atomically into a zeroed output, which we do not do);
* 4-bit group-128, 4096 x 4096, M = 8..32: gemlite's ``GEMM_SPLITK`` winners (BLOCK 16/32 x 64 x 64,
  4 warps, 1 stage; tensor-core tiles, so not for our CUDA-core rows at M <= 4), the split capped
  by our partials rule.

Every entry is to be replaced by a measured one: ``python benchmarks/kernel_speed.py --device-check``
measures and tunes the rows that decide the targets and writes a table to merge here
(``--tune-out``), and ``compressor tune CHECKPOINT`` tunes a checkpoint's own shapes.

    python benchmarks/seed_kernel_tables.py     # rewrites compressor/kernels/configs/hopper.json
"""

from __future__ import annotations

import json
from pathlib import Path

from compressor.kernels.heuristics import (
    codebook_config,
    decode_block_k,
    decode_block_m,
    decode_split_cap,
    decode_unroll,
    decode_warps,
    gpu_config,
    split_k_for,
)
from compressor.kernels.tables import CONFIG_DIR, KernelConfig, table_key

SHAPES = [
    (4096, 4096),
    (1024, 4096),
    (14336, 4096),
    (4096, 14336),  # Llama-3-8B
    (8192, 8192),
    (1024, 8192),
    (28672, 8192),
    (8192, 28672),
]  # Llama-3-70B
KINDS = [("uniform", b, 128) for b in (2, 3, 4, 5, 6, 8)] + [("uniform", 4, 64)] + [("lut", b, -1) for b in (3, 4)]
BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
GEMLITE_GEMV = {  # (N, K): (BLOCK_SIZE_N, num_warps, num_stages), GEMV_REVSPLITK (1, N, K, 128, 8)
    (4096, 4096): (128, 1, 1),
    (1024, 4096): (512, 4, 2),
    (14336, 4096): (256, 2, 2),
    (4096, 14336): (512, 4, 2),
}
GEMLITE_SPLITK = {  # M: (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K), GEMM_SPLITK (M, 4096, 4096, 128, 8), 4 warps, 1 stage
    2: (16, 64, 64, 16),
    4: (16, 64, 64, 16),
    8: (16, 64, 64, 16),
    16: (16, 64, 64, 16),
    32: (32, 64, 64, 8),
}
HEURISTIC = "heuristic gpu_config (132 SMs), unmeasured"


def entry(kind, bits, group, n, k, m) -> dict:
    config, source = gpu_config(m, n, k, group, 132, bits), HEURISTIC
    if kind == "lut":
        config = codebook_config(config, bits)
    if kind == "uniform" and bits == 4 and group == 128:
        if m == 1 and (n, k) in GEMLITE_GEMV:
            block_n, _, stages = GEMLITE_GEMV[n, k]
            cap = decode_split_cap(1, k, bits)
            while block_n > 128 and -(-n // block_n) * cap < 2 * 132:  # gemlite fills the GPU with a far deeper split
                block_n //= 2
            warps = decode_warps(1, block_n, bits)  # up to sixteen columns per thread for the field decode
            block_k = decode_block_k(1, group, bits)  # 16: gemlite's 2 x BLOCK_SIZE_K 8 per program
            unroll = decode_unroll(1, bits)
            split = split_k_for(-(-n // block_n), k, block_k * unroll, 2 * 132, cap)
            config = KernelConfig(
                "decode", 1, block_n, block_k, split, num_warps=warps, num_stages=stages, unroll=unroll, fields=True
            )
            source = (
                f"gemlite h100.json GEMV_REVSPLITK (1, {n}, {k}, 128, 8): BLOCK_N {block_n}, "
                f"{stages} stages; our warps and split rule"
            )
        elif m in GEMLITE_SPLITK and m >= 8 and (n, k) == (4096, 4096):  # its tl.dot tiles: our tensor-core rows
            block_m, block_n, block_k, split = GEMLITE_SPLITK[m]
            if m <= 16:
                block_m = decode_block_m(m)
                block_k = decode_block_k(block_m, group, bits) if block_m < 16 else block_k
                config = KernelConfig(
                    "decode",
                    block_m,
                    block_n,
                    block_k,
                    min(split, decode_split_cap(m, k, bits)),
                    num_warps=4,
                    num_stages=1,
                )
            else:
                config = KernelConfig("gemm", block_m, block_n, block_k, split, num_warps=4, num_stages=1)
            source = f"gemlite h100.json GEMM_SPLITK ({m}, 4096, 4096, 128, 8)" + (
                ", split capped (serial reduction)" if m <= 16 else ""
            )
    return {**config.as_dict(), "source": source}


def main() -> Path:
    entries = {
        table_key(kind, bits, group, n, k, m): entry(kind, bits, group, n, k, m)
        for kind, bits, group in KINDS
        for n, k in SHAPES
        for m in BUCKETS
    }
    table = {
        "family": "hopper",
        "devices": ["H100", "H200", "H800", "H20", "GH200"],
        "about": "Seed table: heuristic and gemlite-derived entries, none measured yet with these kernels "
        "(benchmarks/seed_kernel_tables.py says how each was chosen). Replace entries with measured ones "
        "from `benchmarks/kernel_speed.py --device-check --tune-out` or `compressor tune`.",
        "entries": dict(sorted(entries.items())),
    }
    path = CONFIG_DIR / "hopper.json"
    path.write_text(json.dumps(table, indent=0) + "\n")
    print(f"wrote {len(entries)} entries to {path}")
    return path


if __name__ == "__main__":
    main()
