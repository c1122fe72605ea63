"""Kernel variants for compiling ahead of time, without a GPU: which Triton function a schedule
launches, with which pointer types and constexprs (what ``uniform.quantized_matmul`` passes at run
time), so that Triton's NVIDIA backend and ptxas can build it for an H100 (``TARGET``, sm_90) on any
machine. ``tests/kernels/sm90_compile.py`` compiles them (shared memory, registers, wgmma) and
``benchmarks/kernel_sass.py`` counts the instructions per weight of their K loops.
"""

from __future__ import annotations

import triton.language as tl
from triton.backends.compiler import GPUTarget

from compressor.kernels import codes, decode, dequant, gemm
from compressor.kernels.lut import dequant_lut, dequant_lut_registers, lut_table
from compressor.kernels.packing import kernel_layout

TARGET = GPUTarget("cuda", 90, 32)
FLOAT = {"fp16": ("*fp16", tl.float16), "bf16": ("*bf16", tl.bfloat16), "fp32": ("*fp32", tl.float32)}


def matmul_variant(
    schedule,
    dtype,
    bits,
    lut=False,
    asym=False,
    group=128,
    atomic=False,
    block=(16, 64, 64),
    split_k=1,
    num_warps=4,
    num_stages=2,
    epilogue=0,
    lut_mode="global",
    unroll=1,
    layout=None,
    outliers=False,
    fields=True,
    even_k=True,
):
    """(kernel, pointer types, constexprs, num_warps, num_stages) of one ``decode``, ``gemm`` or
    ``dequant`` variant; ``epilogue`` is the decode kernel's (0 store, 1 serial split-K, 2 atomic);
    ``layout`` the codes' ("planes" or "tens"; default: what the weight kind packs); ``lut_mode``
    "codemajor" compiles the code-major table path for a 4096-column table, "shared" the Gluon decode
    with the table in shared memory (``lut_shared.py``); ``outliers`` the decode
    kernel's in-launch outlier add (serial epilogue); ``even_k`` the decode kernel's EVEN_K (K a
    multiple of its unit: the 8B / 70B shapes)."""
    pointer, dot = FLOAT[dtype]
    if lut and lut_mode == "shared":  # the Gluon decode (``lut_shared.py``): M = 1, 4-bit codes
        from compressor.kernels.lut_shared import _shared_lut_kernel

        _, block_n, block_k = block
        types_ = {"x_ptr": pointer, "w_ptr": "*i32", "table_ptr": "*fp32", "out_ptr": "*fp32"}
        constexprs = {
            "BLOCK_N": block_n,
            "BLOCK_K": block_k,
            "LOG_N": block_n.bit_length() - 1,
            "WARPS": num_warps,
            "EVEN_K": even_k,
        }
        return _shared_lut_kernel, types_, constexprs, num_warps, 1
    layout = layout or ("planes" if lut else kernel_layout(bits))  # what ``packing.pack_uniform`` builds
    block_m, block_n, block_k = block
    types_ = {
        "x_ptr": pointer,
        "w_ptr": "*i32",
        "meta_ptr": "*fp16" if lut else pointer,
        "zs_ptr": "*fp32",
        "bias_ptr": pointer,
        "out_ptr": "*fp32" if atomic or epilogue == 2 else pointer,
        "part_ptr": "*fp32",
        "count_ptr": "*i32",
        "crow_ptr": "*i32",
        "orows_ptr": "*i32",
        "ocols_ptr": "*i32",
        "ovals_ptr": "*fp16",
    }
    codemajor = lut and lut_mode == "codemajor"
    if codemajor:
        types_["meta_ptr"] = "*fp32"
    if lut:
        registers = lut_mode == "registers"
        dequant_fn, table = (dequant_lut_registers, lut_table) if registers else (dequant_lut, codes.no_table)
    else:
        dequant_fn, table = codes.dequant_affine, codes.no_table
    constexprs = {
        "DEQUANT": dequant_fn,
        "TABLE": table,
        "BITS": bits,
        "TENS": layout == "tens",
        "GROUP": -1 if lut else group,
        "ASYM": asym,
        "SCALE_ROW": lut or group == -1 or group % block_k == 0,
    }
    precision = "ieee" if dtype == "fp32" else "tf32"
    if schedule == "dequant":
        kernel = dequant._dequant_kernel
        constexprs.update(BLOCK_N=block_n, BLOCK_K=block_k, OUT_KN=True)
    elif schedule == "decode":
        kernel = decode._decode_kernel
        constexprs.update(
            HAS_BIAS=epilogue != 2,
            EPILOGUE=epilogue,
            DOT_DTYPE=dot,
            FACTOR=not lut and constexprs["SCALE_ROW"],
            UNROLL=unroll,
            LOG_NP=12 if codemajor else 0,
            OUTLIERS=outliers,
            FIELDS=fields and not lut and bits in (2, 4, 8),
            EVEN_K=even_k,
            INPUT_PRECISION=precision,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
        )
    else:
        kernel = gemm._gemm_kernel
        constexprs.update(
            HAS_BIAS=not atomic,
            ATOMIC=atomic,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            DOT_DTYPE=dot,
            INPUT_PRECISION=precision,
            BLOCK_M=block_m,
            GROUP_M=8,
            FACTOR=not lut and constexprs["SCALE_ROW"],
        )
    return kernel, types_, constexprs, num_warps, num_stages
