"""The method modules: one file per method, each registering its recipe steps when imported.

This list is the only place that names them. ``registered_steps`` imports them on first use, so
importing ``compressor.recipe`` (or this module) does not import the methods or torch.
"""

from __future__ import annotations

import importlib

from compressor.step import STEPS, Step

METHOD_MODULES = (
    "compressor.quant.rtn",
    "compressor.quant.efficientqat",
    "compressor.quant.e2e_qp",
    "compressor.quant.squeezellm",
    "compressor.lowrank.transmla",
    "compressor.lowrank.modegpt",
    "compressor.lowrank.svd",
    "compressor.quant.bfp",
    "compressor.lowrank.swiftkv",
    "compressor.quant.qllm",
    "compressor.quant.gptq",
    "compressor.quant.lut_gptq",
    "compressor.quant.awq",
    "compressor.quant.fp8_kv",
    "compressor.quant.rotate",
    "compressor.quant.routers",
)


def registered_steps() -> dict[str, type[Step]]:
    """Every recipe step by name (the method modules are imported here, once)."""
    for module in METHOD_MODULES:
        importlib.import_module(module)
    return dict(sorted(STEPS.items()))
