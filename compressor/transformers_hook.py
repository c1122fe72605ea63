"""``import compressor`` teaches transformers our native format without importing transformers.

Registering ``quant_method: "compressor"`` (``export/hf_quantizer.py``) needs transformers and torch
imported, seconds of work that ``compressor --help`` or ``compressor methods`` should not pay. So the
registration happens when transformers' quantizer table is imported: at once if it already is, else
right after that module runs, through a finder on ``sys.meta_path`` that watches for that one name.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

QUANTIZER_TABLE = "transformers.quantizers.auto"


def register_now() -> None:
    from compressor.export.hf_quantizer import register

    register()


class RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``QUANTIZER_TABLE`` is imported, it takes the spec the other finders
    give and runs the registration after the module's code."""

    def find_spec(self, name, path, target=None):
        if name != QUANTIZER_TABLE:
            return None
        sys.meta_path.remove(self)  # once: let the real finders answer, and never watch again
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def run_then_register(module):
            run_module(module)
            register_now()

        spec.loader.exec_module = run_then_register
        return spec


def register_with_transformers() -> None:
    if QUANTIZER_TABLE in sys.modules:
        register_now()
    elif not any(isinstance(finder, RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, RegisterAfterImport())
