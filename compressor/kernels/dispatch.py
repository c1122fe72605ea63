"""Which path computes ``qlinear``, the per-layer cache of kernel tensors, and kernel configs.

Dispatch rule
-------------
* backend: ``use_backend(name)`` (a context manager) > env ``COMPRESSOR_KERNELS`` > ``auto``.
  ``auto`` runs Triton for CUDA tensors when triton is importable and the torch reference
  otherwise; ``triton`` forces the kernels (on CPU that needs ``TRITON_INTERPRET=1`` set before
  triton is first imported, which is how the tests run them); ``reference`` forces torch.
* schedule and config together, per (kind, bits, group, N, K, M bucket): an explicit ``config=``
  wins; on a GPU the table entry (``tables.py``: a user table from ``compressor tune``, then the
  shipped table of the GPU family), which may say ``dequant`` (dequantize + cuBLAS) where that was
  measured faster; else, only with ``COMPRESSOR_AUTOTUNE=on``, a bounded tuning over
  ``candidate_configs`` kept for the process (``tuned_configs()``); else the heuristic
  ``default_config`` (M <= 16 one-launch decode, M < 64 fused gemm, larger M dequantize + cuBLAS).
  Under the interpreter the heuristic always (its tiles are sized for the interpreter).

Value types whose kind has no entry in the kernel table (``packing.KERNEL_LAYOUTS``) fall back
to the reference on every backend, so a new value type works everywhere before it is fast.

The kernel tensors of a weight (``packing.pack_weight``) are built on first use and cached,
keyed on the weight's own tensors (identity and version counter), so ``QuantizedLinear`` — which
rebuilds its value type from buffers on each forward — packs each layer once per device, and a
buffer replaced or modified in place is repacked.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from compressor.kernels.packing import KERNEL_LAYOUTS
from compressor.kernels.reference import reference_linear
from compressor.kernels.tables import m_bucket
from compressor.weights.values import tensor_names

BACKENDS = ("auto", "triton", "reference")

_backend_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("compressor_kernels", default=None)


@functools.cache
def triton_available() -> bool:
    """Is triton importable? (Imports it; only called when a kernel could actually run.)"""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def requested_backend() -> str:
    choice = _backend_override.get() or os.environ.get("COMPRESSOR_KERNELS", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"COMPRESSOR_KERNELS={choice!r}; expected one of {BACKENDS}")
    return choice


def resolve_backend(x: torch.Tensor) -> str:
    choice = requested_backend()
    if choice == "auto":
        return "triton" if x.is_cuda and triton_available() else "reference"
    return choice


@contextlib.contextmanager
def use_backend(name: str):
    """Force ``qlinear`` onto ``"triton"``, ``"reference"`` or ``"auto"`` inside the block."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r}; expected one of {BACKENDS}")
    token = _backend_override.set(name)
    try:
        yield
    finally:
        _backend_override.reset(token)


def has_kernel(weight) -> bool:
    """Does the kernel table (``packing.KERNEL_LAYOUTS``) have this weight's kind?"""
    return weight.kind in KERNEL_LAYOUTS


# --------------------------------------------------------------------------------------------
# per-layer cache of kernel tensors

_prepared = WeakIdKeyDictionary()


def _stamp(weight):
    tensors = [getattr(weight, name) for name in tensor_names(weight)]
    refs = tuple(None if t is None else (weakref.ref(t), t._version) for t in tensors)
    return tensors, refs


def _stamp_matches(refs, tensors) -> bool:
    for ref, tensor in zip(refs, tensors):
        if (ref is None) != (tensor is None):
            return False
        if ref is not None and (ref[0]() is not tensor or ref[1] != tensor._version):
            return False
    return True


def prepare(weight):
    """(dense, sparse) kernel tensors of a value type (``packing.Packed*`` or None), cached."""
    from compressor.kernels.packing import pack_weight
    from compressor.weights.values import static_fields

    tensors, refs = _stamp(weight)
    anchor = next(t for t in tensors if t is not None)
    static = repr(sorted(static_fields(weight).items()))
    hit = _prepared.get(anchor)
    if hit is not None and hit[0] == static and _stamp_matches(hit[1], tensors):
        return hit[2]
    packed = pack_weight(weight)
    _prepared[anchor] = (static, refs, packed)
    return packed


def clear_cache() -> None:
    _prepared.clear()
    _tuned.clear()


# --------------------------------------------------------------------------------------------
# configs

_tuned: dict[tuple, object] = {}


def autotune_enabled() -> bool:
    """``COMPRESSOR_AUTOTUNE=on`` tunes (bounded) the keys the tables lack; ``off`` (default) never tunes."""
    mode = os.environ.get("COMPRESSOR_AUTOTUNE", "off")
    if mode not in ("on", "off"):
        raise ValueError(f"COMPRESSOR_AUTOTUNE={mode!r}; expected 'on' or 'off'")
    return mode == "on"


def tuned_configs() -> dict:
    """The configs chosen by autotuning in this process, keyed like the tuning cache."""
    return dict(_tuned)


def weight_kind(dense) -> str:
    from compressor.kernels.packing import PackedLUT

    return "lut" if isinstance(dense, PackedLUT) else "uniform"


def table_config(dense, m: int, device_name: str):
    """The table entry (user tables, then the family's shipped one) for this weight at M rows, or None."""
    from compressor.kernels import tables

    n, k = dense.shape
    key = tables.table_key(weight_kind(dense), dense.bits, getattr(dense, "group_size", -1), n, k, m)
    entry = tables.lookup(device_name, key)
    if entry is None:
        return None
    config = tables.KernelConfig.from_dict(entry)
    return config if config.schedule != "decode" or config.block_m >= m else None


def choose_config(x2d, dense, outliers, run):
    """Table entry > (opt-in) bounded autotuning > the heuristic ``default_config``."""
    from compressor.kernels import codes, heuristics

    m, k = x2d.shape
    n = dense.shape[0]
    group = getattr(dense, "group_size", -1)

    def heuristic():
        config = heuristics.default_config(m, n, k, group, x2d.device, dense.bits)
        if weight_kind(dense) == "lut" and getattr(dense, "log_np", 0):
            return heuristics.codebook_config(config, dense.bits)
        return config

    if codes.INTERPRETED or not x2d.is_cuda:
        return heuristic()
    device = _device_name(x2d.device.index)
    config = table_config(dense, m, device)
    if config is not None:
        return config
    if not autotune_enabled():
        return heuristic()
    tune_key = (
        weight_kind(dense),
        dense.bits,
        group,
        n,
        k,
        m_bucket(m),
        device,
        getattr(dense, "zs", None) is not None,
        x2d.dtype,
        outliers is not None,
    )
    if tune_key not in _tuned:
        from compressor.kernels.tune import best_config

        candidates = heuristics.candidate_configs(
            m, n, k, group, x2d.device, dense.bits, lut=weight_kind(dense) == "lut"
        )
        _tuned[tune_key] = best_config(candidates, run)
    return _tuned[tune_key]


@functools.cache
def _device_name(index: int | None) -> str:
    return torch.cuda.get_device_name(index)


# --------------------------------------------------------------------------------------------
# entry points


def triton_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None, config=None) -> torch.Tensor:
    """``x @ W^T + bias`` through the Triton kernels (x of any leading shape)."""
    if not has_kernel(weight):
        return reference_linear(x, weight, bias)
    from compressor.kernels import codes, heuristics
    from compressor.kernels.lut import lut_linear
    from compressor.kernels.packing import PackedLUT
    from compressor.kernels.sparse import outlier_linear
    from compressor.kernels.uniform import uniform_linear

    if not x.is_cuda and not codes.INTERPRETED:
        raise RuntimeError(
            "Triton kernels need CUDA tensors; to run them on CPU set TRITON_INTERPRET=1 before triton is imported, "
            "or use COMPRESSOR_KERNELS=reference"
        )
    n, k = weight.shape
    x2d = x.reshape(-1, k)
    dense, outliers = prepare(weight)
    if dense is None:
        y = outlier_linear(x2d, outliers, bias)
    else:
        linear = lut_linear if isinstance(dense, PackedLUT) else uniform_linear

        def run(cfg):
            if cfg.schedule == "tinygemm":
                from compressor.kernels.tinygemm import tinygemm_linear

                y = tinygemm_linear(x2d, dense, bias) if outliers is None else None
                if y is not None:
                    return y
                cfg = heuristics.default_config(
                    x2d.shape[0], n, k, getattr(dense, "group_size", -1), x2d.device, dense.bits
                )
            return linear(x2d, dense, bias, cfg, outliers)

        y = run(config or choose_config(x2d, dense, outliers, run))
    return y.reshape(*x.shape[:-1], n)


def dequantize(weight, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Dense [N, K] weight: the Triton dequantize kernel on the triton backend, torch elsewhere."""
    device = next(t for t in (getattr(weight, name) for name in tensor_names(weight)) if t is not None).device
    if resolve_backend(torch.empty(0, device=device)) != "triton" or not has_kernel(weight):
        return weight.dequantize(dtype)
    from compressor.kernels.lut import lut_dequantize
    from compressor.kernels.packing import PackedLUT
    from compressor.kernels.uniform import uniform_dequantize

    dense, outliers = prepare(weight)
    if dense is None:
        return weight.dequantize(dtype)
    kernel = lut_dequantize if isinstance(dense, PackedLUT) else uniform_dequantize
    return kernel(dense, dtype, None, outliers)
