"""Shipped kernel-config tables: which schedule and tile each (kernel, width, shape, M bucket) runs.

gemlite's idea (mobiusml/gemlite ``gemlite/configs/h100.json``): tuning winners are data, shipped
with the package per GPU family, so a process never tunes before its first token. A table is a
JSON file::

    {"family": "hopper", "devices": ["H100", "H200", ...], "about": "...",
     "entries": {"uniform/4/g128/4096x4096/m1": {"schedule": "decode", "block_m": 1, ...,
                                                  "source": "where this entry came from"}}}

Keys are ``table_key(kind, bits, group, n, k, m)``: the kind (``uniform`` or ``lut``), the width,
the group size (-1 per channel; codebooks use -1), the layer shape N x K and the M bucket (the next
power of two of M, at most 1024). An entry is a ``KernelConfig`` (below) as a dict, whose
``schedule`` may be ``dequant``: that is how the dispatcher takes dequantize + cuBLAS wherever it
was measured faster. Extra fields (``source``, ``us``) are provenance and are ignored.

Lookup: the files named in ``COMPRESSOR_KERNEL_CONFIGS`` (paths separated by ``os.pathsep``; what
``compressor tune`` writes) first, then the shipped table of the device's family
(``compressor/kernels/configs/<family>.json``), else nothing (the dispatcher's heuristic).
This module is plain Python and json: importing it never imports triton.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

CONFIG_DIR = Path(__file__).with_name("configs")
FAMILIES = {  # family -> device-name patterns (torch.cuda.get_device_name)
    "hopper": r"\b(GH200|H100|H200|H800|H20)\b",
}
MAX_BUCKET = 1024
SCHEDULES = ("decode", "gemm", "dequant", "tinygemm")  # tinygemm: torch's int4 kernel (tinygemm.py), via the dispatcher
LUT_MODES = ("global", "registers", "codemajor", "shared")


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one schedule (``decode``, ``gemm`` or ``dequant``; ``tinygemm`` is torch's
    int4 kernel, which the dispatcher runs for 4-bit group weights where a table chose it).

    ``lut`` only matters for codebook weights: ``global`` gathers each weight's entry from the
    L1-resident table in global memory, ``registers`` keeps the program's [BLOCK_N, 2**bits]
    table in registers and uses ``tl.gather``, ``codemajor`` (decode on CUDA cores, 2/4/8-bit codes)
    turns each code straight into an offset in a code-major fp32 table (lut.py), ``shared`` (decode
    at M = 1, 4-bit codes, on a GPU) copies that table into shared memory (``lut_shared.py``; elsewhere
    it runs as ``codemajor``)."""

    schedule: str
    block_m: int = 16  # decode: rows per program (all of M); gemm: the M tile
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1  # decode / gemm
    group_m: int = 8  # gemm only
    num_warps: int = 4
    num_stages: int = 2
    lut: str = "global"
    unroll: int = 1  # decode, uniform on CUDA cores: K-tiles accumulated between reductions (decode._uniform_rows)
    fields: bool = (
        True  # decode, uniform 2/4/8-bit on CUDA cores: denormal fields (codes.plane_products), else mantissas
    )

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name}={value} must be a power of two")
        if self.block_k < 16:
            raise ValueError("block_k must be >= 16 (and a multiple of min_block_k(bits) for the weight it runs)")
        if self.schedule == "gemm" and min(self.block_m, self.block_n) < 16:
            raise ValueError("tl.dot needs block_m, block_n >= 16")
        if self.schedule == "decode" and self.block_m >= 16 and self.block_n < 16:
            raise ValueError("decode with block_m >= 16 uses tl.dot: block_n must be >= 16")
        if self.split_k < 1:
            raise ValueError("split_k must be >= 1")
        if self.lut not in LUT_MODES:
            raise ValueError(f"lut={self.lut!r}; expected one of {LUT_MODES}")
        if self.unroll not in (1, 2, 4, 8):
            raise ValueError(f"unroll={self.unroll}; expected 1, 2, 4 or 8")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> KernelConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in values.items() if k in known})


def family_for(device_name: str) -> str | None:
    """The GPU family whose shipped table serves this device, or None."""
    for family, pattern in FAMILIES.items():
        if re.search(pattern, device_name):
            return family
    return None


def m_bucket(m: int) -> int:
    """M rounded up to a power of two, at most MAX_BUCKET (prefill sizes share one entry)."""
    return min(MAX_BUCKET, 1 << max(0, (m - 1).bit_length()))


def table_key(kind: str, bits: int, group: int, n: int, k: int, m: int) -> str:
    return f"{kind}/{bits}/g{group}/{n}x{k}/m{m_bucket(m)}"


def read_table(path) -> dict:
    data = json.loads(Path(path).read_text())
    if not isinstance(data.get("entries"), dict):
        raise ValueError(f"{path}: a kernel-config table needs an 'entries' object")
    return data


@functools.cache
def _shipped(family: str) -> dict:
    path = CONFIG_DIR / f"{family}.json"
    return read_table(path)["entries"] if path.exists() else {}


@functools.cache
def _user(paths: str) -> dict:
    entries = {}
    for path in reversed([p for p in paths.split(os.pathsep) if p]):  # the first file wins
        entries.update(read_table(path)["entries"])
    return entries


def lookup(device_name: str, key: str) -> dict | None:
    """The table entry for ``key`` on this device: user tables first, then the family's shipped one."""
    user = os.environ.get("COMPRESSOR_KERNEL_CONFIGS", "")
    if user and key in _user(user):
        return _user(user)[key]
    family = family_for(device_name)
    return _shipped(family).get(key) if family else None


def write_table(path, entries: dict, device_name: str, about: str, merge: bool = True) -> Path:
    """Write (or merge into) a table file; entries are ``{key: config dict + provenance}``."""
    path = Path(path)
    data = {"family": family_for(device_name) or device_name, "devices": [device_name], "about": about, "entries": {}}
    if merge and path.exists():
        old = read_table(path)
        data["entries"] = old["entries"]
        data["devices"] = sorted(set(old.get("devices", [])) | {device_name})
    data["entries"].update(entries)
    data["entries"] = dict(sorted(data["entries"].items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    _user.cache_clear()
    _shipped.cache_clear()
    return path
