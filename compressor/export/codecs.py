"""Export codecs by weight kind: how a quantized linear's value is written into a checkpoint and read back.

A codec is the module of one checkpoint format, and offers:

* ``QUANT_METHOD``: the format's name (the export ``format`` key and the config's ``quant_method``);
* ``PROVENANCE``: what ``compressor.json`` records about its packing;
* ``supports(weight)``: whether it stores this value (a dense-and-sparse value only with a LUT base);
* ``module_entry(weight)``: what the config says about one module, and ``quantization_config(entries,
  ignore)``: the config's ``quantization_config`` from every module's entry;
* ``to_tensors(weight, scale_dtype)`` -> checkpoint tensors (names without the module prefix), and
  ``read_module(tensors, quantization_config, name, dtype)`` -> the value again.

* ``PACKED``: the tensor every quantized module of the format has (how a loader finds them).

``CheckpointWriter`` looks the codec up by the value's ``kind`` and the export ``format``;
``load_quantized_model`` by the checkpoint's ``quant_method``. A new weight kind registers its codec
here (a format may hold several kinds, as ``native`` holds lookup tables with or without outliers,
and a kind may go to several formats, as uniform weights go to compressed-tensors or GPTQ).

``auto`` picks, per value, the format that engines serve: compressed-tensors for uniform weights,
except asymmetric 2- and 3-bit ones, which no compressed-tensors reader serves (vLLM's WNA16 takes
zero points at 4/8 bits only, transformers' loader none) and which go to GPTQ when their shape packs.
"""

from __future__ import annotations

from compressor.export import compressed_tensors, gptq, native

CODECS = {  # the codec ``auto`` uses for each kind
    "uniform": compressed_tensors,
    "lut": native,
    "dense_and_sparse": native,
    "bfp": native,
}
FORMATS = {codec.QUANT_METHOD: codec for codec in (compressed_tensors, gptq, native)}


def codec_for(weight, format: str = "auto", quantized_inputs: bool = False):
    """The codec that writes ``weight`` in export ``format``, or None when that format cannot store it. A
    layer whose inputs are quantized or channel-mapped (W+A) goes to the native format, which records that."""
    if quantized_inputs:
        codec = native if format in ("auto", native.QUANT_METHOD) else None
    elif format != "auto":
        codec = FORMATS.get(format)
        if codec is native and weight.kind == "uniform":  # plain uniform weights: compressed-tensors or GPTQ, which engines read
            codec = None
    elif weight.kind == "uniform" and not weight.symmetric and weight.bits < 4 and gptq.supports(weight):
        codec = gptq
    else:
        codec = CODECS.get(weight.kind)
    return codec if codec is not None and codec.supports(weight) else None
