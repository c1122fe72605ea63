"""The streaming shard writer produces files the safetensors library reads back exactly."""

import json

import pytest
import torch
from safetensors import safe_open

from compressor.export.shards import ShardWriter
from compressor.recipe import parse_size


def test_streamed_shards_read_back_exactly(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(7, 5, generator=generator).to(torch.bfloat16),
        "a.packed": torch.randint(-(2**31), 2**31 - 1, (3, 9), dtype=torch.int32, generator=generator),
        "b.scale": torch.randn(11, generator=generator).half(),
        "b.shape": torch.tensor([4, 2], dtype=torch.int64),
        "c.codes": torch.randint(0, 255, (13,), generator=generator).to(torch.uint8),
        "c.full": torch.randn(2, 3, 4, generator=generator),
        "d.empty": torch.zeros(0, 4),
    }
    writer = ShardWriter(tmp_path, max_shard_bytes=100)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    files = writer.close()
    assert len(files) > 2 and not list(tmp_path.glob("*.data"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(tensors)
    for name, tensor in tensors.items():
        with safe_open(tmp_path / index["weight_map"][name], "pt") as f:
            loaded = f.get_tensor(name)
            assert f.metadata() == {"format": "pt"}
        assert loaded.dtype == tensor.dtype and torch.equal(loaded, tensor), name


def test_one_shard_is_model_safetensors(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_bytes=10**9)
    writer.add("x", torch.ones(3))
    with pytest.raises(ValueError, match="tensor 'x' written twice"):
        writer.add("x", torch.ones(1))
    writer.add("y", torch.zeros(2))
    assert writer.close() == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    from safetensors.torch import load_file

    assert {name: t.tolist() for name, t in load_file(tmp_path / "model.safetensors").items()} == {
        "x": [1.0] * 3,
        "y": [0.0] * 2,
    }


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("1.5 kb") == 1500
    with pytest.raises(ValueError):
        parse_size("lots")
