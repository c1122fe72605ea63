"""Export codecs by weight kind: how a quantized linear's value is written into a checkpoint and read back.

A codec is the module of one checkpoint format, and offers:

* ``QUANT_METHOD``: the format's name (the export ``format`` key and the config's ``quant_method``);
* ``PROVENANCE``: what ``compressor.json`` records about its packing;
* ``supports(weight)``: whether it stores this value (a dense-and-sparse value only with a LUT base);
* ``module_entry(weight)``: what the config says about one module, and ``quantization_config(entries,
  ignore)``: the config's ``quantization_config`` from every module's entry;
* ``to_tensors(weight, scale_dtype)`` -> checkpoint tensors (names without the module prefix), and
  ``read_module(tensors, quantization_config, name, dtype)`` -> the value again.

``CheckpointWriter`` looks the codec up by the value's ``kind``; ``load_quantized_model`` by the
checkpoint's ``quant_method``. A new weight kind registers its codec here (a format may hold several
kinds, as ``native`` holds lookup tables with or without outliers).
"""

from __future__ import annotations

from compressor.export import compressed_tensors, native

CODECS = {
    "uniform": compressed_tensors,
    "lut": native,
    "dense_and_sparse": native,
}
FORMATS = {codec.QUANT_METHOD: codec for codec in CODECS.values()}


def codec_for(weight, quantized_inputs: bool = False):
    """The codec that writes ``weight``, or None when no checkpoint format stores it. A layer whose
    inputs are quantized or channel-mapped (W+A) goes to the native format, which records that."""
    if quantized_inputs:
        return native if native.supports(weight) else None
    codec = CODECS.get(weight.kind)
    return codec if codec is not None and codec.supports(weight) else None
