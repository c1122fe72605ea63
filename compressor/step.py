"""Recipe steps: how a step declares its parameters, how they are validated, and the registry.

Every step is a dataclass registered with ``@register_step("name")``; its fields, declared with
``param(...)``, are the recipe keys, with their defaults, allowed values and one line of help. The
same declarations drive validation (``check_keys``, ``build_config``), the shipped catalogue,
``compressor methods`` and the recipe reference, docs/RECIPES.md (``reference_rows``). This module imports
no method and no torch, so method modules import it and ``compressor.recipe`` sits above them
(``compressor.methods`` lists them).

Validation is strict: unknown keys are errors (with a did-you-mean), and every error is one line
naming the file, the step and the key, e.g. ``recipes/x.yaml: steps[0].rtn.bits: 9 is not one of 2..8``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from dataclasses import field
from typing import Any, ClassVar

import yaml

from compressor.errors import UserError


class RecipeError(UserError):
    """A recipe mistake; its message is one line naming file, location and key."""


# ----------------------------------------------------------------------------------------------
# Declaring parameters


def param(default: Any, help: str, *, choices=None, min=None, max=None):
    """A recipe key: its default, one line of help, and optionally allowed values or bounds."""
    metadata = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def describe_choices(choices) -> str:
    choices = list(choices)
    if (
        len(choices) > 2
        and all(isinstance(c, int) for c in choices)
        and choices == list(range(choices[0], choices[-1] + 1))
    ):
        return f"{choices[0]}..{choices[-1]}"
    return ", ".join(str(c) for c in choices)


# A key's type as plain data, so the shipped catalogue (recipe_catalog.json) can say it without the
# classes: a list of alternatives among "int", "float", "bool", "str", "null", "any" and "list[...]".
_SCALARS = {int: "int", float: "float", bool: "bool", str: "str", type(None): "null", Any: "any"}


def type_spec(tp) -> list[str]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return [alt for arg in typing.get_args(tp) for alt in type_spec(arg)]
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return [f"list[{_SCALARS[inner]}]"]
    return [_SCALARS[tp]]


def _type_name(spec: list[str]) -> str:
    names = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "any": "anything"}
    plural = {"int": "integers", "float": "numbers", "str": "strings", "bool": "true/false values", "any": "values"}
    words = [
        f"a list of {plural[alt[5:-1]]}" if alt.startswith("list[") else names[alt] for alt in spec if alt != "null"
    ]
    return " or ".join(words)


def _matches_type(value, spec: list[str]) -> bool:
    return any(_matches_one(value, alt) for alt in spec)


def _matches_one(value, alt: str) -> bool:
    if alt.startswith("list["):
        return isinstance(value, list) and all(_matches_one(v, alt[5:-1]) for v in value)
    if alt in ("float", "int"):
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        return numeric and (alt == "float" or isinstance(value, int))
    return {"any": True, "null": value is None, "bool": isinstance(value, bool), "str": isinstance(value, str)}[alt]


SHOWN_CHARACTERS = 80  # a value quoted in a message is cut to this


LARGEST_INTEGER = 2**31 - 1  # no count, size or index in a recipe goes beyond this


def shown(value) -> str:
    """``value`` as an error message quotes it: its repr (control characters escaped), at most one short line,
    built without expanding big or deeply shared structures (YAML anchors can nest a list a billion times)."""
    short = reprlib.Repr()  # (keyword arguments only from Python 3.12)
    short.maxlevel, short.maxlist, short.maxdict = 3, 6, 6
    short.maxstring = short.maxother = SHOWN_CHARACTERS
    try:
        text = short.repr(value)
    except ValueError:  # an integer with more digits than Python converts to text
        text = f"an integer of {value.bit_length()} bits"
    return text if len(text) <= SHOWN_CHARACTERS else f"{text[: SHOWN_CHARACTERS - 3]}..."


def key_text(key) -> str:
    """A key as a message names it: as written when it is a short printable string, else ``shown``."""
    return key if isinstance(key, str) and key.isprintable() and len(key) <= SHOWN_CHARACTERS else shown(key)


def did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def param_specs(cls) -> list[dict]:
    """Each recipe key of a config class as plain data: key, type, default, help, choices, min, max."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        choices = f.metadata.get("choices")
        specs.append(
            {
                "key": f.name,
                "type": type_spec(hints[f.name]),
                "default": f.default if f.default is not dataclasses.MISSING else f.default_factory(),
                "help": f.metadata.get("help", ""),
                "choices": None if choices is None else list(choices),
                "min": f.metadata.get("min"),
                "max": f.metadata.get("max"),
            }
        )
    return specs


def check_keys(raw, specs: list[dict], where: str, source: str) -> dict:
    """Validate a mapping from YAML against ``param_specs``; returns it with integers given for
    numbers made floats. Every error is one line naming the file, the location and the key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: {where}: expected a mapping of keys, got {raw!r}")
    by_key = {spec["key"]: spec for spec in specs}
    for key in raw:
        if key not in by_key:
            allowed = ", ".join(by_key) or "no keys"
            raise RecipeError(
                f"{source}: {where}.{key_text(key)}: unknown key{did_you_mean(key, by_key)}; allowed: {allowed}"
            )
    for key, value in raw.items():
        spec, at = by_key[key], f"{source}: {where}.{key}"
        if not _matches_type(value, spec["type"]):
            raise RecipeError(f"{at}: {shown(value)} is not {_type_name(spec['type'])}")
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(f"{at}: {shown(value)} is not a finite number")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > LARGEST_INTEGER:
            raise RecipeError(f"{at}: {shown(value)} is beyond the largest integer a recipe takes, {LARGEST_INTEGER}")
        if spec["choices"] is not None and value not in spec["choices"]:
            raise RecipeError(f"{at}: {shown(value)} is not one of {describe_choices(spec['choices'])}")
        if spec["min"] is not None and value is not None and value < spec["min"]:
            raise RecipeError(f"{at}: {shown(value)} is below the minimum {spec['min']}")
        if spec["max"] is not None and value is not None and value > spec["max"]:
            raise RecipeError(f"{at}: {shown(value)} is above the maximum {spec['max']}")
        for pattern in value if isinstance(value, list) else [value]:
            if isinstance(pattern, str) and pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as error:
                    raise RecipeError(f"{at}: {shown(pattern)} is not a valid regular expression ({error})") from None
    return {
        k: (float(v) if "float" in by_key[k]["type"] and isinstance(v, int) and not isinstance(v, bool) else v)
        for k, v in raw.items()
    }


def build_config(cls, raw, where: str, source: str):
    """Validate ``raw`` (a mapping from YAML) against dataclass ``cls`` and build it."""
    return construct(cls, check_keys(raw, param_specs(cls), where, source), where, source)


def construct(cls, values: dict, where: str, source: str):
    config = cls(**values)
    try:
        config.check()
    except ValueError as error:  # cross-field checks raise ValueError("key: message")
        raise RecipeError(f"{source}: {where}.{error}") from None
    return config


class Config:
    """Base of every recipe section and step config: cross-field checks go in ``check``."""

    def check(self) -> None:
        """Raise ``ValueError("key: what is wrong")`` for combinations of keys that cannot work."""

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


# ----------------------------------------------------------------------------------------------
# Steps and their registry


class Step(Config):
    """A recipe step. Subclasses are dataclasses registered with ``@register_step``.

    ``kind`` says how the session runs it:

    * ``"layer"``: ``compress_block(context)`` is called for each decoder block in turn with a
      ``compressor.context.BlockContext``: the block and its calibration inputs, produced by the
      already-compressed blocks before it (``compress_group`` with several blocks' contexts when the
      step's ``blocks_per_call`` is above 1);
    * ``"model"``: ``compress_model(context)`` is called once with a ``compressor.context.ModelContext``.

    ``needs_calibration`` is False for data-free steps (RTN), which then never run a forward pass.
    ``quantizes_weights`` and ``changes_architecture`` feed the order rules (``pipeline.check_step_order``).
    ``families`` names the architecture families (``compressor.arch.ADAPTERS`` rows) whose block structure the
    step assumes; None: every family with an adapter, hand-written or generic (``pipeline.check_family``).
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "layer"
    needs_calibration: ClassVar[bool] = True
    # what the recipe's order rules read (checked before any work): a step that quantizes weights claims the
    # linears it would quantize, which no later quantizer may claim again; a step that changes the
    # architecture comes before every quantizer, once per recipe
    quantizes_weights: ClassVar[bool] = False
    changes_architecture: ClassVar[bool] = False
    writes_plain_uniform: ClassVar[bool] = False  # weights for compressed-tensors/GPTQ, not our native format
    declares_kv_cache: ClassVar[bool] = False  # a quantized KV cache, which only our native format records
    families: ClassVar[tuple[str, ...] | None] = None  # the families whose block it assumes (None: any)
    # how a data-dependent step runs on several processes (compressor/distributed.py): "sums" (statistics summed
    # over tokens, reduced to an owner that solves), "gradients" (training reduces gradients over ranks), "ranges"
    # (per-channel sums and maxima all-reduced, every rank computes the same); None
    # refuses --nproc > 1 before any work (data-free steps need nothing: every rank computes the same)
    distributes: ClassVar[str | None] = None
    # a model step whose training commits its progress for --resume (``distill.train_end_to_end``); the others
    # start over when a run is resumed
    commits_progress: ClassVar[bool] = False
    needs_native_export: ClassVar[bool] = False  # leaves what only our native W+A format records (online Hadamard)

    @property
    def blocks_per_call(self) -> int:
        """Consecutive blocks a layer step compresses together: above 1, the session calls ``compress_group``
        with that many blocks' contexts (the last group may be shorter) instead of ``compress_block``."""
        return 1

    @property
    def prepares_model(self) -> bool:
        """A layer step that first needs the whole model (GPTQ's bit allocation): the session calls
        ``prepare_model(context)`` with a ``ModelContext`` before the step's layer pass."""
        return False

    def prepare_model(self, context) -> None:
        raise NotImplementedError(f"{self.name} prepares nothing on the whole model")

    def compress_group(self, contexts: list) -> None:
        """Compress consecutive blocks together: ``contexts[0].inputs`` enter the first, the others' inputs are
        None (the session runs the group after the step returns)."""
        raise NotImplementedError(f"{self.name} compresses one block at a time")

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]

    def check_config(self, config) -> None:
        """Refuse a model config this step cannot work on (its sizes, its architecture), before the
        weights are read. Raise ``ValueError("key: why")``."""

    def check_model(self, linears: dict) -> None:
        """Refuse a model this step cannot work on, before any work: ``linears`` maps the full name of
        every block linear the step would see (its ``ignore`` applied) to the module, weights on the
        meta device. Raise ``ValueError("key: why")``."""


STEPS: dict[str, type[Step]] = {}


def register_step(name: str):
    """Class decorator: make a dataclass ``Step`` available to recipes under ``name``."""

    def decorate(cls):
        if name in STEPS:
            raise ValueError(f"step '{name}' is registered twice ({STEPS[name].__module__} and {cls.__module__})")
        if not (dataclasses.is_dataclass(cls) and issubclass(cls, Step)):
            raise TypeError(f"step '{name}' must be a dataclass subclass of Step")
        cls.name = name
        STEPS[name] = cls
        return cls

    return decorate


def reference_rows(specs: list[dict]) -> list[tuple[str, str, str]]:
    """(key, default, help) rows for one step or section: ``compressor methods`` and docs/RECIPES.md."""
    rows = []
    for spec in specs:
        help_text = spec["help"]
        if spec["choices"] is not None:
            help_text += f" ({describe_choices(spec['choices'])})"
        shown = yaml.safe_dump(spec["default"], default_flow_style=True).removesuffix("...\n").strip()
        rows.append((spec["key"], shown, f"{help_text} [{_type_name(spec['type'])}]"))
    return rows
