"""Writing safetensors shards as tensors arrive, holding no more than one tensor in memory."""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
}


class ShardWriter:
    """Streams tensors into safetensors shards: memory stays at one tensor, whatever the shard size.

    The safetensors library writes a file from a dict held in memory. Here each tensor's bytes are
    appended to the open shard's data file as it arrives; when the shard is full, the header (JSON,
    space-padded to 8 bytes as the format recommends) is written and the data copied after it.
    """

    def __init__(self, directory: Path, max_shard_bytes: int, metadata: dict | None = None):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = metadata or {"format": "pt"}
        self.shard_files: list[Path] = []
        self.weight_map: dict[str, int] = {}
        self.total_bytes = 0
        self._entries: dict[str, dict] = {}
        self._data = None
        self._data_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        self.add_parts(name, tuple(tensor.shape), tensor.dtype, [tensor])

    def add_parts(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, parts: Iterable[torch.Tensor]) -> None:
        """One tensor of ``shape`` whose data is the bytes of ``parts`` in order (cast to ``dtype``): a stacked
        tensor (a layer's fused experts) written without ever being built."""
        if name in self.weight_map or name in self._entries:
            raise ValueError(f"tensor '{name}' written twice")
        size = math.prod(shape) * dtype.itemsize
        if self._entries and self._data_bytes + size > self.max_shard_bytes:
            self.flush()
        if self._data is None:
            self._data = open(self.directory / f"shard-{len(self.shard_files):05d}.data", "wb")
        written = 0
        for part in parts:
            part = part.detach().to("cpu", dtype).contiguous()
            self._data.write(part.reshape(-1).view(torch.uint8).numpy().data)  # no copy
            written += part.numel() * part.element_size()
        if written != size:
            raise ValueError(f"tensor '{name}': its parts hold {written} bytes, its shape {list(shape)} needs {size}")
        self._entries[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [self._data_bytes, self._data_bytes + size],
        }
        self._data_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if self._data is None:
            return
        data_path = Path(self._data.name)
        self._data.close()
        header = json.dumps({"__metadata__": self.metadata, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        path = self.directory / f"shard-{len(self.shard_files):05d}.safetensors"
        with open(path, "wb") as shard, open(data_path, "rb") as data:
            shard.write(struct.pack("<Q", len(header)))
            shard.write(header)
            shutil.copyfileobj(data, shard, length=16 * 2**20)
        data_path.unlink()
        self.weight_map.update({name: len(self.shard_files) for name in self._entries})
        self.shard_files.append(path)
        self._entries, self._data, self._data_bytes = {}, None, 0

    def close(self) -> list[str]:
        """Give the shards their final names and write the index; returns the file names."""
        self.flush()
        count = len(self.shard_files)
        names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        for path, name in zip(self.shard_files, names):
            path.rename(self.directory / name)
        if count > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {tensor: names[shard] for tensor, shard in sorted(self.weight_map.items())},
            }
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names
