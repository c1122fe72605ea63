"""qlinear: backend choice, the per-layer cache of kernel tensors, QuantizedLinear end to end."""

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from kernel_helpers import DEVICE, assert_matches

import compressor.kernels as kernels
from compressor.kernels import dispatch, exact_linear, qlinear, use_backend
from compressor.kernels.heuristics import (
    DECODE_MAX_M,
    DEQUANT_MIN_M,
    candidate_configs,
    decode_split_cap,
    default_config,
    gpu_config,
    schedule_for,
)
from compressor.kernels.tables import KernelConfig
from compressor.modules.linear import QuantizedLinear
from compressor.weights.values import DenseAndSparseWeight

N, K = 37, 200


def all_kinds(weights):
    uniform = weights.uniform(N, K, 5, 64, symmetric=False)
    lut = weights.lut(N, K, 3)
    outliers = weights.outliers(N, K)
    return {
        "uniform": uniform,
        "lut": lut,
        "sparse": outliers,
        "uniform+outliers": DenseAndSparseWeight.from_parts(uniform, outliers),
        "lut+outliers": DenseAndSparseWeight.from_parts(lut, outliers),
    }


def test_backend_resolution(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.delenv("COMPRESSOR_KERNELS", raising=False)
    assert dispatch.resolve_backend(x) == "reference"  # CPU tensor: the torch reference
    monkeypatch.setenv("COMPRESSOR_KERNELS", "triton")
    assert dispatch.resolve_backend(x) == "triton"
    with use_backend("reference"):  # the context manager beats the environment
        assert dispatch.resolve_backend(x) == "reference"
    monkeypatch.setenv("COMPRESSOR_KERNELS", "cuda")
    with pytest.raises(ValueError, match="COMPRESSOR_KERNELS"):
        dispatch.resolve_backend(x)
    with pytest.raises(ValueError):
        with use_backend("fast"):
            pass


def test_quantized_linear_runs_every_kind_through_the_kernels(weights, monkeypatch):
    """The same module, forced through Triton (env var) and through the reference; x with leading dims."""
    for name, weight in all_kinds(weights).items():
        module = QuantizedLinear(weight, weights.bias(N, torch.float32)).to(DEVICE)
        for m in (1, 3):
            x = weights.x(2 * m, K, torch.float16).reshape(2, m, K)
            expected = exact_linear(x, weight, module.bias)
            monkeypatch.setenv("COMPRESSOR_KERNELS", "triton")
            assert_matches(module(x), expected, torch.float16, f"{name} triton M={m}")
            monkeypatch.setenv("COMPRESSOR_KERNELS", "reference")
            assert_matches(module(x), expected, torch.float16, f"{name} reference M={m}")


def test_kernel_tensors_are_packed_once_per_layer_and_repacked_when_the_weights_change(weights):
    module = QuantizedLinear(weights.uniform(N, K, 4, 32)).to(DEVICE)
    first = dispatch.prepare(module.quantized_weight)
    assert dispatch.prepare(module.quantized_weight) is first  # a rebuilt value type, same buffers: cached
    x = weights.x(1, K, torch.float32)
    with use_backend("triton"):
        before = module(x)
        module.codes[0, 0] ^= 1  # in place: the version counter changes
        assert dispatch.prepare(module.quantized_weight) is not first
        flipped = module(x)
        assert_matches(flipped, exact_linear(x, module.quantized_weight), torch.float32)
        assert (flipped - before).abs().max() > 0  # a stale packing would still give `before`
        module.scales = module.scales * 2  # a new tensor in the buffer's place
        assert_matches(module(x), 2 * flipped, torch.float32)


def test_cache_entries_die_with_their_weights(weights):
    dispatch.clear_cache()
    weight = weights.uniform(N, K, 4, 32)
    dispatch.prepare(weight)
    assert len(dispatch._prepared) == 1
    del weight
    assert len(dispatch._prepared) == 0


def test_value_types_without_a_kernel_fall_back_to_the_reference():
    @dataclass
    class Dense:  # e.g. a future value type: only the protocol, no kernel
        matrix: torch.Tensor
        kind = "dense-test"

        @property
        def shape(self):
            return tuple(self.matrix.shape)

        def dequantize(self, dtype=None):
            return self.matrix.to(dtype or self.matrix.dtype)

    weight = Dense(torch.randn(5, 8))
    x = torch.randn(3, 8)
    with use_backend("triton"):
        torch.testing.assert_close(qlinear(x, weight), x @ weight.matrix.t())


def test_dequantize_through_the_kernel(weights):
    for name, weight in all_kinds(weights).items():
        with use_backend("triton"):
            dense = kernels.dequantize(weight, torch.float32)
        torch.testing.assert_close(dense, weight.dequantize(torch.float32), rtol=0, atol=1e-6, msg=name)


def test_schedule_thresholds_and_configs():
    assert schedule_for(DECODE_MAX_M) == "decode" and schedule_for(DECODE_MAX_M + 1) == "gemm"
    assert schedule_for(DEQUANT_MIN_M - 1) == "gemm" and schedule_for(DEQUANT_MIN_M) == "dequant"
    for m in (1, 2, 3, 16, 17, 64, 65, 512, 4096):
        for n, k, group in ((4096, 4096, 128), (1024, 14336, 64), (28672, 8192, -1), (37, 200, 48)):
            configs = candidate_configs(m, n, k, group, torch.device("cpu"), bits=3, lut=True)
            assert configs and len(configs) == len(set(configs)) and len(configs) <= 16  # bounded tuning
            assert configs[0] == default_config(m, n, k, group, torch.device("cpu"), bits=3)
            if m <= DECODE_MAX_M:  # decode candidates take all M rows in one program
                assert all(c.schedule == "decode" and c.block_m >= m for c in configs)
                assert any(c.lut == "registers" for c in configs)
            else:  # prefill: the fused tiles compete with dequantize + cuBLAS
                assert {c.schedule for c in configs} == {"gemm", "dequant"}
    with pytest.raises(ValueError):
        KernelConfig("gemm", block_m=8)
    with pytest.raises(ValueError):
        KernelConfig("decode", block_k=48)


@pytest.mark.parametrize(
    "n,k,bits", [(4096, 4096, 4), (1024, 4096, 4), (14336, 4096, 3), (4096, 14336, 2), (8192, 28672, 4)]
)
def test_decode_heuristic_fills_an_h100_with_small_partials(n, k, bits):
    """Without a table entry, decode at M = 1 puts at least two programs on each of the 132 SMs
    (or as many as the split cap allows), and the serial split-K partials stay under half the
    packed weight."""
    config = gpu_config(1, n, k, 128, sms=132, bits=bits)
    programs = -(-n // config.block_n) * config.split_k
    k_tiles = -(-k // config.block_k)
    assert programs >= 264 or config.split_k in (decode_split_cap(1, k, bits), k_tiles)
    weight_bytes, partial_bytes = n * k * bits / 8, config.split_k * n * 4 * 2
    assert partial_bytes <= weight_bytes / 2
    assert config.split_k <= k_tiles  # never more splits than K-tiles


SUBPROCESS_ENV = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "COMPRESSOR_KERNELS")}


def test_import_and_cpu_inference_work_without_triton():
    code = """
import sys, importlib.abc
class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "triton":
            raise ModuleNotFoundError("No module named 'triton'")
sys.meta_path.insert(0, NoTriton())
import torch, compressor, compressor.kernels
from compressor.weights.values import UniformWeight
from compressor.modules.linear import QuantizedLinear
w = UniformWeight(codes=torch.full((4, 8), 9, dtype=torch.uint8), scales=torch.ones(4, 1), bits=4, group_size=-1)
y = QuantizedLinear(w)(torch.ones(2, 8))
assert torch.equal(y, torch.full((2, 4), 8.0)), y
assert not compressor.kernels.triton_available()
assert not any(m.split(".")[0] == "triton" for m in sys.modules)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_forcing_triton_on_cpu_without_the_interpreter_explains_how(weights, monkeypatch):
    from compressor.kernels import codes

    monkeypatch.setattr(codes, "INTERPRETED", False)  # as if triton had been imported without it
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        qlinear(torch.ones(1, K), weights.uniform(N, K, 4, 32, device="cpu"))
