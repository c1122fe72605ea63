"""Quantizers: each file one method (listed in ``compressor.methods``), plus the shared uniform math."""
