"""Checkpoint export (writers) and loading exported checkpoints back into our modules.

The names below load their modules on first use, so that light modules (the recipe's checks of the
export section) can import ``compressor.export.shards`` without the writers' heavy dependencies."""

from importlib import import_module

_WHERE = {
    "CheckpointWriter": "compressor.export.checkpoint",
    "ExportError": "compressor.export.output",
    "atomic_output_dir": "compressor.export.output",
    "load_quantized_model": "compressor.export.loading",
}

__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'compressor.export' has no attribute {name!r}")
