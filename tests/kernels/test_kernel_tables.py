"""Shipped kernel-config tables, user tables, opt-in autotuning and ``compressor tune``."""

import json

import pytest
import torch
from click.testing import CliRunner
from kernel_helpers import DEVICE, assert_matches

from compressor.kernels import dispatch, exact_linear, tables, triton_linear, tune
from compressor.kernels.heuristics import DEQUANT_MIN_M
from compressor.kernels.packing import pack_uniform
from compressor.kernels.tables import KernelConfig

LLAMA_8B = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]


def test_devices_find_their_family_table():
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA GH200 480GB", "NVIDIA H20"):
        assert tables.family_for(name) == "hopper", name
    for name in ("NVIDIA A100-SXM4-80GB", "NVIDIA H2000 Ada", "cpu"):
        assert tables.family_for(name) is None, name
    assert [tables.m_bucket(m) for m in (1, 2, 3, 16, 17, 64, 1000, 50000)] == [1, 2, 4, 16, 32, 64, 1024, 1024]


def test_the_shipped_hopper_table_covers_the_targets_and_every_entry_runs_its_bucket():
    entries = tables.read_table(tables.CONFIG_DIR / "hopper.json")["entries"]
    for n, k in LLAMA_8B:  # the rows the targets are measured on
        for m in (1, 16, 64, 256):
            for kind, bits, group in (("uniform", 4, 128), ("uniform", 3, 128), ("lut", 4, -1)):
                assert tables.table_key(kind, bits, group, n, k, m) in entries
    for key, entry in entries.items():
        config = KernelConfig.from_dict(entry)
        bucket = int(key.rsplit("/m", 1)[1])
        assert entry["source"], key
        if config.schedule == "decode":  # all the bucket's rows fit in one program
            assert config.block_m >= bucket, key
        else:
            assert bucket > 16, key
        if bucket >= DEQUANT_MIN_M:  # prefill: dequantize + cuBLAS until a fused tile is measured faster
            assert config.schedule == "dequant", key
    gemlite = entries[tables.table_key("uniform", 4, 128, 4096, 14336, 1)]
    assert gemlite["block_n"] == 512 and "gemlite" in gemlite["source"]


def test_user_tables_come_before_the_shipped_one(tmp_path, monkeypatch):
    key = tables.table_key("uniform", 4, 128, 4096, 4096, 1)
    shipped = tables.lookup("NVIDIA H100 80GB HBM3", key)
    assert shipped is not None and tables.lookup("NVIDIA A100-SXM4-80GB", key) is None
    mine = KernelConfig("decode", block_m=1, block_n=256, block_k=32, split_k=2).as_dict()
    path = tables.write_table(tmp_path / "mine.json", {key: mine}, "NVIDIA H100 80GB HBM3", "test")
    tables.write_table(path, {"uniform/3/g128/8x32/m1": mine}, "NVIDIA H200", "test")  # merges
    data = json.loads(path.read_text())
    assert len(data["entries"]) == 2 and data["devices"] == ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
    monkeypatch.setenv("COMPRESSOR_KERNEL_CONFIGS", str(path))
    assert tables.lookup("NVIDIA H100 80GB HBM3", key) == mine
    assert tables.lookup("NVIDIA A100-SXM4-80GB", key) == mine  # a user table serves any device
    other = tables.table_key("uniform", 4, 128, 1024, 4096, 1)
    assert (
        tables.lookup("NVIDIA H100 80GB HBM3", other)
        == tables.read_table(tables.CONFIG_DIR / "hopper.json")["entries"][other]
    )


def test_table_config_follows_the_entry_and_never_gives_decode_fewer_rows_than_m(weights, tmp_path, monkeypatch):
    dense = pack_uniform(weights.uniform(64, 256, 4, 128))
    key = tables.table_key("uniform", 4, 128, 64, 256, 3)  # bucket 4
    right = KernelConfig("decode", block_m=4, block_n=32, block_k=64).as_dict()
    path = tables.write_table(tmp_path / "t.json", {key: right}, "NVIDIA H100", "test")
    monkeypatch.setenv("COMPRESSOR_KERNEL_CONFIGS", str(path))
    assert dispatch.table_config(dense, 3, "NVIDIA H100") == KernelConfig.from_dict(right)
    wrong = KernelConfig("decode", block_m=2, block_n=32, block_k=64).as_dict()  # 2 rows for bucket 4
    tables.write_table(path, {key: wrong}, "NVIDIA H100", "test")
    assert dispatch.table_config(dense, 3, "NVIDIA H100") is None  # falls back to tuning / the heuristic
    dequant = tables.table_key("uniform", 4, 128, 64, 256, 100)
    tables.write_table(
        path, {dequant: KernelConfig("dequant", block_n=64, block_k=64).as_dict()}, "NVIDIA H100", "test"
    )
    assert dispatch.table_config(dense, 100, "NVIDIA H100").schedule == "dequant"


def test_autotuning_is_opt_in(monkeypatch):
    monkeypatch.delenv("COMPRESSOR_AUTOTUNE", raising=False)
    assert not dispatch.autotune_enabled()
    monkeypatch.setenv("COMPRESSOR_AUTOTUNE", "on")
    assert dispatch.autotune_enabled()
    monkeypatch.setenv("COMPRESSOR_AUTOTUNE", "max")
    with pytest.raises(ValueError, match="COMPRESSOR_AUTOTUNE"):
        dispatch.autotune_enabled()


def test_tuning_measures_candidates_and_writes_a_table_the_dispatcher_reads(weights, tmp_path, monkeypatch):
    """Under the interpreter the times mean nothing, but the machinery is the GPU's: candidates run,
    the fastest that runs is kept, a broken one is skipped, and the table it writes is read back."""
    weight = weights.uniform(40, 96, 3, 32, symmetric=False)
    x = weights.x(1, 96, torch.float32)
    good = KernelConfig("decode", block_m=1, block_n=64, block_k=32, split_k=3)
    broken = KernelConfig("decode", block_m=1, block_n=64, block_k=32)

    def run(config):
        if config is broken:
            raise RuntimeError("out of resources")
        return triton_linear(x, weight, None, config)

    timings = tune.measure([broken, good], run, on_gpu=False)
    assert timings[0] == (broken, None) and timings[1][1] > 0
    assert tune.best_config([broken, good], run, on_gpu=False) is good

    from compressor.kernel_tuning import tune_weights

    entries = tune_weights(
        {("uniform", 3, 32, 40, 96): weight}, ms=(1, 20), dtype=torch.float32, device=DEVICE, max_candidates=2
    )
    assert set(entries) == {tables.table_key("uniform", 3, 32, 40, 96, m) for m in (1, 20)}
    assert all(e["us"] > 0 and "tuned on" in e["source"] for e in entries.values())
    path = tables.write_table(tmp_path / "tuned.json", entries, "NVIDIA H100", "test")
    monkeypatch.setenv("COMPRESSOR_KERNEL_CONFIGS", str(path))
    config = dispatch.table_config(dispatch.prepare(weight)[0], 1, "NVIDIA H100")
    assert config == KernelConfig.from_dict(entries[tables.table_key("uniform", 3, 32, 40, 96, 1)])
    assert_matches(triton_linear(x, weight, None, config), exact_linear(x, weight), torch.float32)


def test_tune_command_needs_a_gpu(tmp_path):
    from compressor.cli import main

    if torch.cuda.is_available():
        pytest.skip("this checks the CPU refusal")
    result = CliRunner().invoke(main, ["tune", str(tmp_path), "-o", str(tmp_path / "t.json")])
    assert result.exit_code == 2 and "GPU" in result.output
