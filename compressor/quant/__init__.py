"""Quantizers: each file one method, registered as a recipe step when this package is imported."""

from compressor.quant import rtn  # noqa: F401
from compressor.quant import efficientqat  # noqa: F401
from compressor.quant import squeezellm  # noqa: F401
