"""Checkpoint export (writers) and loading exported checkpoints back into our modules."""

from compressor.export.checkpoint import CheckpointWriter, ExportError, atomic_output_dir
from compressor.export.loading import load_quantized_model

__all__ = ["CheckpointWriter", "ExportError", "atomic_output_dir", "load_quantized_model"]
