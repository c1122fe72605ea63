"""Writing safetensors shards as tensors arrive, never holding more than one shard in memory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B)\s*", str(text).upper())
    if not match:
        raise ValueError(f"{text!r} is not a size like 2GB or 500MB")
    return int(float(match.group(1)) * UNITS[match.group(2)])


class ShardWriter:
    """Collects tensors and flushes a shard file whenever the next tensor would overflow it."""

    def __init__(self, directory: Path, max_shard_bytes: int, metadata: dict | None = None):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = metadata or {"format": "pt"}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shard_files: list[Path] = []
        self.weight_map: dict[str, int] = {}
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map or name in self.pending:
            raise ValueError(f"tensor '{name}' written twice")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.directory / f"shard-{len(self.shard_files):05d}.safetensors"
        save_file(self.pending, path, metadata=self.metadata)
        self.weight_map.update({name: len(self.shard_files) for name in self.pending})
        self.shard_files.append(path)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Give the shards their final names and write the index; returns the file names."""
        self.flush()
        count = len(self.shard_files)
        names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for path, name in zip(self.shard_files, names):
            path.rename(self.directory / name)
        if count > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {tensor: names[shard] for tensor, shard in sorted(self.weight_map.items())},
            }
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names
