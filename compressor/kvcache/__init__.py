"""The KV-cache channel: quantized KV caches by method name, for the code that runs a model.

An export declares its cache as the ``kv_cache`` entry of its ``quantization_config``; the entry's
``method`` names a row of ``CACHE_METHODS`` (method -> module). A method module offers:

* ``Spec``: the entry's typed form (``method``, ``to_dict``, ``from_dict``, ``quantize_fresh``: whether
  the tokens of the current forward attend to their own quantized entries), what a step declares;
* ``prepare(model, spec, device)``: what the model needs before its weights load (BFP: ``k_perm`` buffers);
* ``install(model, spec)``: from then on every forward or ``generate`` that would start an empty cache
  starts this one; returns the hook's handle;
* ``bytes_per_token(model, spec)``: what the cache stores per token, against bf16;
* ``describe(summary)``: one line for people, from ``summary``'s dict.

Eval, the loaders and the transformers quantizer call the functions below, never a method module; a new
cache method is its module and one row.
"""

from __future__ import annotations

from importlib import import_module

CACHE_METHODS = {"bfp": "compressor.kvcache.bfp", "fp8": "compressor.kvcache.fp8"}
INSTALLED = "_compressor_kv_cache"  # the model attribute holding (spec, hook handle) while a cache is installed


def cache_method(method: str):
    if method not in CACHE_METHODS:
        raise ValueError(f"kv_cache method {method!r} is not known (known: {', '.join(CACHE_METHODS)})")
    return import_module(CACHE_METHODS[method])


def spec_from_entry(entry: dict):
    """The typed spec of a config's ``kv_cache`` entry."""
    return cache_method(entry.get("method", "")).Spec.from_dict(entry)


def prepare(model, entry: dict, device="meta") -> None:
    """Before a checkpoint's weights load: give ``model`` what its cache reads from the checkpoint."""
    spec = spec_from_entry(entry)
    cache_method(spec.method).prepare(model, spec, device)


def install(model, entry: dict) -> None:
    """Every forward (and ``generate``) of ``model`` that would start an empty cache starts the declared one."""
    remove(model)
    spec = spec_from_entry(entry)
    setattr(model, INSTALLED, (spec, cache_method(spec.method).install(model, spec)))


def remove(model) -> None:
    """Back to the model's ordinary full-precision cache."""
    installed = getattr(model, INSTALLED, None)
    if installed is not None:
        installed[1].remove()
        setattr(model, INSTALLED, None)


def installed_spec(model):
    """The spec of the cache installed on ``model``, or None."""
    installed = getattr(model, INSTALLED, None)
    return None if installed is None else installed[0]


def summary(model) -> dict | None:
    """The installed cache's spec and bytes per token (for eval's report), or None."""
    spec = installed_spec(model)
    if spec is None:
        return None
    return {**spec.to_dict(), **cache_method(spec.method).bytes_per_token(model, spec)}


def describe(summary: dict) -> str:
    """One line saying what the cache of ``summary`` stores and what it costs."""
    return cache_method(summary["method"]).describe(summary)
