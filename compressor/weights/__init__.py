"""Quantized weights, apart from the methods that produce them and the exporters that write them.

* ``formats.py``: the value types (``UniformWeight``, ``LUTWeight``, ``SparseOutliers``,
  ``DenseAndSparseWeight``): tensors plus static metadata, reference dequantization, bits per weight;
* ``linear.py``: ``QuantizedLinear``, the module holding a value in a model, and ``dequantize_model_``.

``formats.py`` imports nothing of the toolkit; kernels, methods and export import it.
"""
