"""GPU-only: the kernels compiled for the device at Llama-size shapes, bf16 tensor cores, autotuning,
CUDA-graph capture, the shipped table's configs and validate's speed measurement. Skipped without CUDA."""

import pytest
import torch
from kernel_helpers import Weights, assert_matches

from compressor.kernels import dispatch, exact_linear, triton_linear, tuned_configs
from compressor.weights.values import DenseAndSparseWeight

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

N, K = 1024, 4096  # a Llama-3-8B k/v projection


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", range(1, 9))
def test_every_width_at_llama_size_with_autotuning(bits, symmetric, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_AUTOTUNE", "on" if bits in (3, 4) else "off")
    weights = Weights(bits)
    weight = weights.uniform(N, K, bits, 128, symmetric, scale_dtype=torch.bfloat16)
    for m in (1, 16, 40, 2048):  # decode (CUDA cores), decode (tl.dot), gemm, dequantize + cuBLAS
        for dtype in (torch.float16, torch.bfloat16):
            x = weights.x(m, K, dtype)
            assert_matches(triton_linear(x, weight), exact_linear(x, weight), dtype, f"M={m}")


def test_autotuning_keeps_one_config_per_shape_and_m_bucket(monkeypatch):
    """Opt-in tuning covers the keys no table has (3072 x 4096 is in no shipped table)."""
    monkeypatch.setenv("COMPRESSOR_AUTOTUNE", "on")
    monkeypatch.delenv("COMPRESSOR_KERNEL_CONFIGS", raising=False)
    dispatch.clear_cache()
    weights = Weights()
    weight = weights.uniform(3072, 4096, 4, 128)
    for m in (1, 5, 6):  # 5 and 6 share the bucket 8
        triton_linear(weights.x(m, 4096, torch.float16), weight)
    assert len(tuned_configs()) == 2


@pytest.mark.parametrize("bits", [3, 4])
def test_lut_and_dense_and_sparse_on_gpu(bits):
    weights = Weights()
    lut = weights.lut(N, K, bits, lut_dtype=torch.float16)
    weight = DenseAndSparseWeight.from_parts(lut, weights.outliers(N, K, density=0.005))
    for m in (1, 32, 300):
        x = weights.x(m, K, torch.bfloat16)
        assert_matches(triton_linear(x, lut), exact_linear(x, lut), torch.bfloat16, f"lut M={m}")
        assert_matches(triton_linear(x, weight), exact_linear(x, weight), torch.bfloat16, f"lut+outliers M={m}")


def test_decode_step_can_be_captured_in_a_cuda_graph():
    weights = Weights()
    weight = weights.uniform(N, K, 4, 128)
    x = weights.x(1, K, torch.float16)
    y = triton_linear(x, weight)  # prepare + tune outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = triton_linear(x, weight)
    x.copy_(weights.x(1, K, torch.float16))
    graph.replay()
    assert_matches(y_graph, exact_linear(x, weight), torch.float16)
    assert not torch.equal(y_graph, y)


def test_validate_measures_speed_on_gpu(tmp_path):
    from compressor import Recipe, apply
    from compressor.testing import make_random_model
    from compressor.validate import format_validation_report, validate_checkpoint

    source = make_random_model("llama", tmp_path / "source")
    apply(
        Recipe.from_dict({"steps": [{"rtn": {"bits": 4, "group_size": 64}}], "export": {}}),
        source,
        tmp_path / "w4",
        progress=False,
    )
    result = validate_checkpoint(tmp_path / "w4", "cuda", seq_len=64, max_windows=1)
    assert result["ok"] and not result["correctness_only"]
    assert result["speed"]["quantized"]["decode_tok_s"] > 0 and result["speed"]["dense"]["prefill_tok_s"] > 0
    assert "decode" in format_validation_report(result)


def test_every_shipped_table_entry_for_the_8b_shapes_runs_and_is_right():
    """The shipped configs compile on this GPU and compute the reference (4-bit, 3-bit, LUT-4)."""
    from compressor.kernels import tables
    from compressor.kernels.tables import KernelConfig

    weights = Weights()
    name = torch.cuda.get_device_name()
    if tables.family_for(name) is None:
        pytest.skip(f"no shipped table for {name}")
    for n, k in ((4096, 4096), (1024, 4096)):
        for kind, bits in (("uniform", 4), ("uniform", 3), ("lut", 4)):
            weight = weights.uniform(n, k, bits, 128) if kind == "uniform" else weights.lut(n, k, bits)
            for m in (1, 16, 64, 256):
                entry = tables.lookup(name, tables.table_key(kind, bits, 128 if kind == "uniform" else -1, n, k, m))
                x = weights.x(m, k, torch.float16)
                y = triton_linear(x, weight, None, KernelConfig.from_dict(entry))
                assert_matches(y, exact_linear(x, weight), torch.float16, f"{kind} {bits} {n}x{k} M={m}")


@pytest.mark.parametrize("n,k", [(37, 200), (1024, 4096), (4096, 4096)])
def test_shared_memory_codebook_decode_on_gpu(n, k):
    """The Gluon LUT-4 decode (``lut_shared.py``: table in shared memory, inline-PTX lookups) against
    the reference: a column tail, a K tail, split-K, strided x; and the default config picks it."""
    from compressor.kernels.lut import lut_linear, shared_applies
    from compressor.kernels.packing import pack_lut
    from compressor.kernels.tables import KernelConfig

    weights = Weights(4)
    weight = weights.lut(n, k, 4)
    packed = pack_lut(weight)
    bias = weights.bias(n, torch.float16)
    for split in (1, 3, 16):
        config = KernelConfig("decode", block_m=1, block_n=1024, block_k=16, split_k=split, num_warps=2, lut="shared")
        x = weights.x(1, 2 * k, torch.float16)[:, ::2]
        assert shared_applies(config, packed, x, None)
        assert_matches(
            lut_linear(x, packed, bias, config), exact_linear(x, weight, bias), torch.float16, f"split {split}"
        )
    x = weights.x(1, k, torch.bfloat16)
    assert_matches(triton_linear(x, weight), exact_linear(x, weight), torch.bfloat16, "default config")
