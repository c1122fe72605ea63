"""Structural and low-rank transforms: each file one method, registered as a recipe step on import."""
