"""MoDeGPT's sliced architecture: the config a ``modegpt`` step declares with ``export: sliced``.

The modeling code (``modeling_modegpt.py``, shipped beside the weights) and its registration are the
package's row in ``arch/shipped.py``; this module builds the config: the base family's plus one key,
``modegpt``, with each layer's widths.
"""

from __future__ import annotations

from compressor.arch.shipped import architecture


def sliced_config(base_config, layers: list[dict]):
    """The sliced model's config: ``base_config`` (a stock family config) plus the per-layer sizes."""
    row = architecture("modegpt")
    model_type = next(t for t, family in row.model_types.items() if family == base_config.model_type)
    config_class, model_class = row.classes[model_type]
    values = {k: v for k, v in base_config.to_dict().items() if k not in ("model_type", "auto_map", "architectures")}
    config = row.shipped_class(config_class).from_dict({**values, "modegpt": {"version": 1, "layers": layers}})
    config.architectures = [model_class.rpartition(".")[2]]
    return config
