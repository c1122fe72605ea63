"""Recipe steps: how a step declares its parameters, how they are validated, and the registry.

Every step is a dataclass registered with ``@register_step("name")``; its fields, declared with
``param(...)``, are the recipe keys, with their defaults, allowed values and one line of help. The
same declarations drive validation (``build_config``), ``compressor methods`` and the README's
recipe reference (``step_reference``). This module imports no method and no torch, so method
modules import it and ``compressor.recipe`` sits above them (``compressor.methods`` lists them).

Validation is strict: unknown keys are errors (with a did-you-mean), and every error is one line
naming the file, the step and the key, e.g. ``recipes/x.yaml: steps[0].rtn.bits: 9 is not one of 2..8``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import field
from typing import Any, ClassVar

import yaml


class RecipeError(ValueError):
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
    if isinstance(choices, range):
        return f"{choices.start}..{choices.stop - 1}"
    return ", ".join(str(c) for c in choices)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(inner, str(inner))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _matches_type(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches_type(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_matches_type(v, inner) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def build_config(cls, raw, where: str, source: str):
    """Validate ``raw`` (a mapping from YAML) against dataclass ``cls`` and build it."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: {where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in fields:
            allowed = ", ".join(fields) or "no keys"
            raise RecipeError(
                f"{source}: {where}.{key}: unknown key{did_you_mean(key, fields)}; allowed: {allowed}"
            )
    for key, value in raw.items():
        meta = fields[key].metadata
        if not _matches_type(value, hints[key]):
            raise RecipeError(f"{source}: {where}.{key}: {value!r} is not {_type_name(hints[key])}")
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            raise RecipeError(f"{source}: {where}.{key}: {value!r} is not one of {describe_choices(choices)}")
        low, high = meta.get("min"), meta.get("max")
        if low is not None and value is not None and value < low:
            raise RecipeError(f"{source}: {where}.{key}: {value!r} is below the minimum {low}")
        if high is not None and value is not None and value > high:
            raise RecipeError(f"{source}: {where}.{key}: {value!r} is above the maximum {high}")
    config = cls(**{k: (float(v) if hints[k] is float and isinstance(v, int) else v) for k, v in raw.items()})
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
      already-compressed blocks before it;
    * ``"model"``: ``compress_model(context)`` is called once with a ``compressor.context.ModelContext``.

    ``needs_calibration`` is False for data-free steps (RTN), which then never run a forward pass.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "layer"
    needs_calibration: ClassVar[bool] = True

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]


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


def step_reference(cls) -> list[tuple[str, str, str]]:
    """(key, default, help) rows for one step: the source of ``compressor methods`` and the README."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        if f.metadata.get("choices") is not None:
            help_text += f" ({describe_choices(f.metadata['choices'])})"
        shown = yaml.safe_dump(default, default_flow_style=True).removesuffix("...\n").strip()
        rows.append((f.name, shown, f"{help_text} [{_type_name(hints[f.name])}]"))
    return rows
