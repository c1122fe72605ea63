"""Structural and low-rank transforms: each file one method (listed in ``compressor.methods``)."""
