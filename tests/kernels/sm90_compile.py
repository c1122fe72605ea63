"""Compile our kernels for an H100 (sm_90) without a GPU: Triton's NVIDIA backend and ptxas run on
any machine, so every stage (TTIR -> TTGIR -> LLVM -> PTX -> cubin) is exercised here.

Run as a script (without TRITON_INTERPRET, which would replace the compiler); prints one JSON line
per variant: name, shared memory bytes, whether the PTX uses wgmma (Hopper tensor cores), registers
per thread and spill bytes (ptxas -v), error. Besides fixed variants it compiles the decode configs
the shipped Hopper table gives the Llama-3-8B shapes. The variants themselves (kernel, pointer types,
constexprs) come from ``compressor.kernels.variants``, which ``benchmarks/kernel_sass.py`` shares.
``test_compile_sm90.py`` runs it; ``python tests/kernels/sm90_compile.py --all`` compiles more.
"""

import json
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if "compressor" not in sys.modules:  # only the kernels are needed: skip the toolkit's heavy __init__
    package = types.ModuleType("compressor")
    package.__path__ = [str(ROOT / "compressor")]
    sys.modules["compressor"] = package

import triton  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.experimental.gluon import GluonASTSource  # noqa: E402
from triton.experimental.gluon._runtime import GluonJITFunction  # noqa: E402

from compressor.kernels import sparse  # noqa: E402
from compressor.kernels.variants import TARGET, matmul_variant  # noqa: E402


def compile_variant(kernel, pointer_types: dict, constexprs: dict, num_warps=4, num_stages=2):
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types[name]
        else:
            signature[name] = "i32"
    source = GluonASTSource if isinstance(kernel, GluonJITFunction) else ASTSource  # lut_shared.py is Gluon
    compiled = triton.compile(
        source(fn=kernel, signature=signature, constexprs=constexprs),
        target=TARGET,
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    return {
        "shared": compiled.metadata.shared,
        "wgmma": "wgmma" in compiled.asm["ptx"],
        **registers(compiled.asm["ptx"]),
    }


def registers(ptx: str) -> dict:
    """Registers per thread and spill bytes, from Triton's own ptxas run with -v on the PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        done = subprocess.run(
            [get_ptxas(90).path, "-arch=sm_90a", "-v", str(source), "-o", str(source.with_suffix(".cubin"))],
            capture_output=True,
            text=True,
        )
    used = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.search(r"(\d+) bytes spill stores", done.stderr)
    return {"registers": int(used.group(1)) if used else None, "spill_bytes": int(spills.group(1)) if spills else None}


def table_variants() -> dict:
    """The distinct decode configs the shipped Hopper table gives the Llama-3-8B shapes (4-, 3-, 2-bit,
    LUT-4; M = 1 and 16), as compile variants."""
    from compressor.kernels.tables import CONFIG_DIR, KernelConfig, read_table, table_key

    entries = read_table(CONFIG_DIR / "hopper.json")["entries"]
    variants = {}
    for n, k in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
        for kind, bits, group in (("uniform", 4, 128), ("uniform", 3, 128), ("uniform", 2, 128), ("lut", 4, -1)):
            for m in (1, 16):
                c = KernelConfig.from_dict(entries[table_key(kind, bits, group, n, k, m)])
                name = (
                    f"table decode M{c.block_m} {kind} {bits}b bn{c.block_n} bk{c.block_k} w{c.num_warps} "
                    f"s{c.num_stages} {c.lut} unroll{c.unroll} fields={c.fields} split={c.split_k > 1}"
                )
                variants[name] = matmul_variant(
                    "decode",
                    "fp16",
                    bits,
                    lut=kind == "lut",
                    group=group,
                    block=(c.block_m, c.block_n, c.block_k),
                    split_k=c.split_k,
                    num_warps=c.num_warps,
                    num_stages=c.num_stages,
                    epilogue=1 if c.split_k > 1 else 0,
                    lut_mode=c.lut,
                    unroll=c.unroll,
                    fields=c.fields,
                )
    return variants


VARIANTS = {
    "decode M1 uniform 3b asym fp16 serial split-K": matmul_variant(
        "decode", "fp16", 3, asym=True, block=(1, 128, 64), split_k=8, epilogue=1
    ),
    "decode M1 uniform 3b planes fp16": matmul_variant(
        "decode", "fp16", 3, block=(1, 512, 32), split_k=8, epilogue=1, layout="planes"
    ),
    "decode M4 uniform 3b bf16 tens group 48": matmul_variant(
        "decode", "bf16", 3, group=48, block=(4, 128, 32), split_k=4, epilogue=1
    ),
    "decode M1 lut 4b fp16 codemajor": matmul_variant(
        "decode", "fp16", 4, lut=True, block=(1, 512, 16), split_k=8, epilogue=1, lut_mode="codemajor", num_warps=2
    ),
    "dequant uniform 3b tens fp16": matmul_variant("dequant", "fp16", 3, block=(1, 128, 64)),
    "decode M1 uniform 4b bf16 group 32 store": matmul_variant("decode", "bf16", 4, group=32, block=(1, 256, 32)),
    "decode M1 uniform 5b fp16 group 48 (per-weight scales)": matmul_variant(
        "decode", "fp16", 5, group=48, block=(1, 128, 64), split_k=4, epilogue=1
    ),
    "decode M4 uniform 4b fp16 CUDA cores": matmul_variant(
        "decode", "fp16", 4, block=(4, 128, 32), split_k=4, epilogue=1
    ),
    "decode M1 uniform 4b fp16 unroll 4": matmul_variant(
        "decode", "fp16", 4, block=(1, 512, 16), split_k=8, epilogue=1, unroll=4
    ),
    "decode M16 uniform 4b fp16 tl.dot": matmul_variant("decode", "fp16", 4, block=(16, 64, 64), split_k=4, epilogue=1),
    "decode M1 lut 4b fp16 global, outliers": matmul_variant(
        "decode", "fp16", 4, lut=True, block=(1, 128, 64), split_k=4, epilogue=2
    ),
    "decode M1 lut 4b fp16 registers": matmul_variant(
        "decode", "fp16", 4, lut=True, block=(1, 128, 64), split_k=4, epilogue=1, lut_mode="registers"
    ),
    "gemm uniform 4b fp16 M32 split-K": matmul_variant("gemm", "fp16", 4, atomic=True, block=(32, 64, 128), split_k=4),
    "gemm uniform 5b bf16 tiled 64x128": matmul_variant("gemm", "bf16", 5, block=(64, 128, 64), num_stages=3),
    "gemm uniform 7b asym fp16 tiled 128x128": matmul_variant(
        "gemm", "fp16", 7, asym=True, block=(128, 128, 64), num_warps=8, num_stages=3
    ),
    "gemm uniform 2b fp32 (ieee)": matmul_variant("gemm", "fp32", 2, block=(16, 64, 64)),
    "gemm uniform 3b tens fp16 tiled": matmul_variant("gemm", "fp16", 3, block=(64, 64, 64), num_stages=3),
    "gemm lut 3b bf16 tiled": matmul_variant("gemm", "bf16", 3, lut=True, block=(64, 128, 64), num_stages=3),
    "dequant uniform 6b fp16": matmul_variant("dequant", "fp16", 6, asym=True, block=(1, 128, 64)),
}
MORE_VARIANTS = {
    f"decode M1 uniform {b}b fp16": matmul_variant("decode", "fp16", b, block=(1, 128, 64), split_k=4, epilogue=1)
    for b in range(1, 9)
} | {
    f"gemm uniform {b}b bf16 64x128": matmul_variant("gemm", "bf16", b, block=(64, 128, 64), num_stages=3)
    for b in range(1, 9)
}


def main(argv):
    variants = {**VARIANTS, **table_variants(), **(MORE_VARIANTS if "--all" in argv else {})}
    outlier = (
        sparse._outlier_kernel,
        {"x_ptr": "*fp16", "rows_ptr": "*i32", "cols_ptr": "*i32", "vals_ptr": "*fp16", "ws_ptr": "*fp32"},
        {"BLOCK": 256, "ROWS": 16},
        4,
        1,
    )
    for name, (kernel, types_, constexprs, warps, stages) in {**variants, "outlier add": outlier}.items():
        try:
            row = {"name": name, **compile_variant(kernel, types_, constexprs, warps, stages)}
        except Exception as exc:  # report, do not stop: the test names every failing variant
            row = {"name": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
