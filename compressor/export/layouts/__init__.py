"""Checkpoint layouts: how one weight kind (or a layer's input side) is laid out as tensors.

A layout owns what a compressed-tensors compressor owns, for one kind of value in one format:

* ``kind``: the ``kind`` its modules carry in the config entry;
* ``stores(weight)``: whether it writes this value (a dense-and-sparse value only with a LUT base);
* ``entry(weight)``: what the config says about one module (the loader builds the module from it);
* ``tensors(weight, scale_dtype)``: the checkpoint tensors, names without the module prefix;
* ``tensor_specs(entry, shape)``: each tensor's ``TensorSpec`` (shape and dtype) from the entry alone,
  so a loader can allocate the tensors before reading any;
* ``read(tensors, entry)``: the value again.

A format's codec (``export/native.py``) holds its layouts in a table keyed by ``kind``; a new weight
kind is its value type, one layout file here and one row in that table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None  # None: a floating tensor in the dtype it was stored in (or the model's)


def padded_columns(k: int) -> int:
    """Input features rounded up to the 32 of the kernels' planes packing (``kernels/packing.py``)."""
    return -(-k // 32) * 32


def check_tensors(tensors: dict[str, torch.Tensor], specs: dict[str, TensorSpec]) -> None:
    """Raise ``ValueError`` naming the first tensor that is missing or has another shape than its spec."""
    for name, spec in specs.items():
        if name not in tensors:
            raise ValueError(f"missing tensor {name}")
        if tuple(tensors[name].shape) != spec.shape:
            raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, expected {spec.shape}")
