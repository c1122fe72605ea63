"""``ExportDeclaration``: what the steps of a run declared about the export besides its weights.

A step that changes the architecture declares an ``ExportArchitecture`` (``compressor.arch``); a step
that quantizes the KV cache declares its cache method's spec (``compressor.kvcache``). The session holds
one declaration for the run and hands it to the writer, which turns it into the config.
"""

from __future__ import annotations

from dataclasses import dataclass

from compressor.arch import ExportArchitecture


@dataclass
class ExportDeclaration:
    architecture: ExportArchitecture | None = None  # a new config, and modeling code where transformers has none
    kv_cache: object | None = None  # a cache method's spec, written as ``quantization_config.kv_cache``

    def kv_cache_entry(self) -> dict | None:
        return None if self.kv_cache is None else self.kv_cache.to_dict()
