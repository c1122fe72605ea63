"""Checkpoints in our native format declare their own architecture, so that they fail closed.

Without our quantizer transformers would skip ``quant_method: "compressor"`` with a warning and hand back
the model with random weights in every quantized layer. So the writer gives a native checkpoint the
model type ``compressor_<family>`` (``native_config``) and ships ``modeling_compressor.py``: plain
transformers refuses it, ``trust_remote_code=True`` imports compressor (or says to install it), and
after ``import compressor`` it loads without remote code (this package's row in ``arch/shipped.py``).
"""

from __future__ import annotations

from compressor.arch.shipped import architecture


def native_config(config):
    """``config`` (a stock family's) as the config of its native-format checkpoint."""
    row = architecture("native")
    if row.model_type_for(config.model_type) is None:
        raise ValueError(
            f"model_type {config.model_type!r} cannot hold native-format weights (families: "
            f"{', '.join(row.model_types.values())}); use export format 'dense' or a compressed-tensors quantizer"
        )
    return row.config_from(config)
