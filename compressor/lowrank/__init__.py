"""Structural and low-rank transforms: each file one method, registered as a recipe step on import."""
from compressor.lowrank import transmla  # noqa: F401
