"""Quantized weight values, apart from the methods that produce them, the modules that run them and the
exporters that write them.

``values.py``: the value types (``UniformWeight``, ``LUTWeight``, ``SparseOutliers``,
``DenseAndSparseWeight``, ``BFPWeight``) as tensors plus static metadata, with reference dequantization
and bits per weight, and the BFP number format. It imports nothing of the toolkit; kernels, modules,
methods and export import it.
"""
