"""``import compressor`` teaches transformers our native format and our architectures without
importing transformers.

Registering ``quant_method: "compressor"`` (``export/hf_quantizer.py``) and the architectures our
exports declare (``arch/shipped.py``: ``AutoConfig`` and ``AutoModelForCausalLM`` learn ``llama_swiftkv``,
``modegpt_llama`` and the rest) needs transformers and torch imported, seconds of work that ``compressor --help``
or ``compressor methods`` should not pay. So each registration happens once the transformers table it
extends is imported: at once if it already is, else through a finder on ``sys.meta_path``.

transformers imports its tables half way through other modules (``modeling_utils`` imports
``modeling_auto``, which imports ``configuration_auto``), and our classes import transformers modules
that may be the ones half done; and the registrations import our own ``compressor.arch`` modules,
which may themselves be half done (``compressor.arch.swiftkv.modeling_llama_swiftkv`` imports
``transformers.modeling_utils``, which imports the model table). So the finder follows every
``transformers.*`` and ``compressor.arch.*`` module imported while a registration is due, and runs the
due registrations only when none of them is still running.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

QUANTIZER_TABLE = "transformers.quantizers.auto"
CONFIG_TABLE = "transformers.models.auto.configuration_auto"
MODEL_TABLE = "transformers.models.auto.modeling_auto"
# modules whose import the finder follows: transformers, and ours that the registrations import
FOLLOWED = ("transformers", "compressor.arch")


def register_quantizer() -> None:
    from compressor.export.hf_quantizer import register

    register()


def register_architecture_configs() -> None:
    from compressor.arch.shipped import register_configs

    register_configs()


def register_architecture_models() -> None:
    from compressor.arch.shipped import register_models

    register_models()


# the transformers module each registration extends -> the registration
REGISTRATIONS = {
    QUANTIZER_TABLE: register_quantizer,
    CONFIG_TABLE: register_architecture_configs,
    MODEL_TABLE: register_architecture_models,
}


class RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the loading of each ``FOLLOWED`` module the other finders find,
    and once no such module is half imported runs the registrations whose table has loaded."""

    def __init__(self, pending: dict):
        self.pending = dict(pending)  # table not imported yet -> registration
        self.due: list = []  # tables imported, registration waiting for the imports around it to finish
        self.running: list[str] = []  # followed modules whose code is running now
        self.finding: set[str] = set()
        self.registering = False  # a registration imports transformers modules too: no nested runs

    def find_spec(self, name, path, target=None):
        if not name.startswith(FOLLOWED) or name in self.finding:
            return None
        self.finding.add(name)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.finding.discard(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def run_then_register(module):
            self.running.append(name)
            try:
                run_module(module)
            finally:
                self.running.remove(name)
            if name in self.pending:
                self.due.append(self.pending.pop(name))
            if not self.running:
                self.run_due()

        spec.loader.exec_module = run_then_register
        return spec

    def run_due(self) -> None:
        if self.registering:
            return
        self.registering = True
        try:
            while self.due:
                self.due.pop(0)()
        finally:
            self.registering = False
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)


def register_with_transformers() -> None:
    """Run each registration whose table is imported; follow imports for the others. A registration
    imports transformers modules itself (the shipped architectures import ``modeling_utils``, which
    imports the quantizer table), so the tables are looked at again until none is newly imported."""
    if any(isinstance(finder, RegisterAfterImport) for finder in sys.meta_path):
        return
    pending = dict(REGISTRATIONS)
    while imported := [name for name in pending if name in sys.modules]:
        for name in imported:
            pending.pop(name)()
    if pending:
        sys.meta_path.insert(0, RegisterAfterImport(pending))
