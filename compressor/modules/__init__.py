"""The modules that run quantized values inside a model (above the kernels, below everything that builds
or writes models).

* ``linear.py``: ``QuantizedLinear``, the ``nn.Module`` holding a value type in place of an ``nn.Linear``
  (forward through ``compressor.kernels.qlinear``), and ``dequantize_model_``;
* ``activations.py``: activation quantization shared by every W+A method (per-token fake quantization,
  ``ChannelMap``, quantized attention operands).
"""
