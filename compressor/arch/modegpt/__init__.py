"""MoDeGPT's sliced architecture: the config a ``modegpt`` step declares with ``export: sliced``.

The modeling code (``modeling_modegpt.py``, shipped beside the weights) and its registration are the
package's row in ``arch/shipped.py``; this module builds the config: the base family's plus one key,
``modegpt``, with each layer's widths.
"""

from __future__ import annotations

from compressor.arch.shipped import architecture


def sliced_config(base_config, layers: list[dict]):
    """The sliced model's config: ``base_config`` (a stock family config) plus the per-layer sizes."""
    return architecture("modegpt").config_from(base_config, modegpt={"version": 1, "layers": layers})
