"""Export codecs: how a quantized linear's value is written into a checkpoint format and read back.

A codec is the module of one checkpoint format, and offers:

* ``QUANT_METHOD``: the format's name (the export ``format`` key and the config's ``quant_method``);
* ``PROVENANCE``: what ``compressor.json`` records about its packing;
* ``PACKED``: the tensor every quantized module of the format has (how a loader finds them);
* ``supports(weight, quantized_inputs)``: whether it stores this value (for a layer whose inputs are
  quantized or channel-mapped when ``quantized_inputs``);
* ``module_entry(weight)``: what the config says about one module, and ``quantization_config(entries,
  ignore)``: the config's ``quantization_config`` from every module's entry;
* ``to_tensors(weight, scale_dtype)`` -> checkpoint tensors (names without the module prefix), and
  ``read_module(tensors, quantization_config, name, dtype)`` -> the value again;
* ``INPUTS``: the layout of a layer's input side (``export/layouts/inputs.py``), or None when the format
  cannot record quantized inputs.

The native format keeps one layout per weight kind (``export/layouts/``); compressed-tensors and GPTQ
store uniform weights. ``CheckpointWriter`` asks ``codec_for``; ``load_quantized_model`` looks the codec
up by the checkpoint's ``quant_method``.

``auto`` picks, per value, the first format of ``AUTO`` that stores it (compressed-tensors, which engines
serve, before ours), except asymmetric 2- and 3-bit uniform weights, which no compressed-tensors reader
serves (vLLM's WNA16 takes zero points at 4/8 bits only, transformers' loader none) and which go to GPTQ
first (when their shape packs), and with them every asymmetric uniform weight of a run that may make such
weights (a bit allocation mixing 2- and 8-bit layers: ``gptq_first``).
"""

from __future__ import annotations

from compressor.export import compressed_tensors, gptq, native

AUTO = (compressed_tensors, native)  # the formats ``auto`` tries, in order
FORMATS = {codec.QUANT_METHOD: codec for codec in (compressed_tensors, gptq, native)}


def codec_for(weight, format: str = "auto", quantized_inputs: bool = False, gptq_first: bool = False):
    """The codec that writes ``weight`` in export ``format``, or None when that format cannot store it.
    A layer whose inputs are quantized or channel-mapped (W+A) goes to a format with an input side.
    ``gptq_first``: the run may make asymmetric weights below 4 bits (``gptq.writes_low_asymmetric``), so under
    ``auto`` every asymmetric uniform weight goes to GPTQ with them (one checkpoint, one format: a bit
    allocation's 8-bit layers beside its 2-bit ones)."""
    low = weight.kind == "uniform" and not weight.symmetric and (weight.bits < 4 or gptq_first)
    if format != "auto":
        candidates = (FORMATS.get(format),)
    elif not quantized_inputs and low:
        candidates = (gptq, *AUTO)
    else:
        candidates = AUTO
    return next((codec for codec in candidates if codec is not None and codec.supports(weight, quantized_inputs)), None)
