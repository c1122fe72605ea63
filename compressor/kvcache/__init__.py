"""Quantized KV caches used at inference (transformers ``Cache`` classes) and how a model gets one."""
