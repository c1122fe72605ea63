"""Recipes: YAML <-> typed objects, and the registry of recipe steps.

A recipe is three sections::

    calibration: {dataset: demo, samples: 128, seq_len: 512, seed: 0}
    steps:
      - rtn: {bits: 4, group_size: 128, symmetric: false, ignore: [lm_head]}
    export: {format: auto}

Every step is a dataclass registered with ``@register_step("name")``; its fields, declared with
``param(...)``, are the recipe keys, with their defaults, allowed values and one line of help. The
same declarations drive validation, ``compressor methods`` and the README's recipe reference, so
nothing else changes when a method is added.

Validation is strict: unknown sections, steps and keys are errors (with a did-you-mean), and every
error is one line naming the file, the step and the key, e.g.
``recipes/x.yaml: steps[0].rtn.bits: 9 is not one of 2..8``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
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


def _did_you_mean(word: str, options) -> str:
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
                f"{source}: {where}.{key}: unknown key{_did_you_mean(key, fields)}; allowed: {allowed}"
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

    * ``"layer"``: ``compress_block(block, context)`` is called for each decoder block in turn, with
      the block's calibration inputs produced by the already-compressed blocks before it;
    * ``"model"``: ``compress_model(model, context)`` is called once with the whole model.

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


def registered_steps() -> dict[str, type[Step]]:
    import compressor.lowrank  # noqa: F401  (importing the method packages registers their steps)
    import compressor.quant  # noqa: F401

    return dict(sorted(STEPS.items()))


# ----------------------------------------------------------------------------------------------
# The recipe


@dataclass
class CalibrationConfig(Config):
    dataset: str = param("demo", "calibration text: 'demo', a local .txt/.jsonl/.parquet file or folder, or a datasets name")
    samples: int = param(128, "number of calibration sequences", min=1)
    seq_len: int = param(512, "tokens per calibration sequence", min=8)
    seed: int = param(0, "seed for choosing the sequences")
    split: str = param("train", "dataset split (datasets names only)")
    text_column: str = param("text", "column holding the text (jsonl, parquet and datasets names)")


@dataclass
class ExportConfig(Config):
    format: str = param("auto", "checkpoint format (auto: compressed-tensors for uniform weights, compressor for lookup tables)",
                        choices=("auto", "compressed-tensors", "compressor", "dense"))
    dtype: str = param("auto", "dtype of unquantized tensors and scales", choices=("auto", "float16", "bfloat16", "float32"))
    max_shard_size: str = param("5GB", "largest safetensors shard, e.g. 2GB or 500MB")

    def check(self) -> None:
        from compressor.export.shards import parse_size

        try:
            parse_size(self.max_shard_size)
        except ValueError as error:
            raise ValueError(f"max_shard_size: {error}") from None


SECTIONS = ("calibration", "steps", "export")


@dataclass
class Recipe:
    steps: list[Step] = field(default_factory=list)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    source: str = "<recipe>"

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"{path}: no such recipe file")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark else ""
            raise RecipeError(f"{path}: {where}not valid YAML ({getattr(error, 'problem', error)})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data, source: str = "<recipe>") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe is a mapping with the sections {', '.join(SECTIONS)}")
        for key in data:
            if key not in SECTIONS:
                raise RecipeError(f"{source}: {key}: unknown section{_did_you_mean(key, SECTIONS)}; allowed: {', '.join(SECTIONS)}")
        raw_steps = data.get("steps")
        if not isinstance(raw_steps, list) or not raw_steps:
            raise RecipeError(f"{source}: steps: expected a non-empty list of steps, got {raw_steps!r}")
        steps = [parse_step(entry, i, source) for i, entry in enumerate(raw_steps)]
        return cls(
            steps=steps,
            calibration=build_config(CalibrationConfig, data.get("calibration"), "calibration", source),
            export=build_config(ExportConfig, data.get("export"), "export", source),
            source=source,
        )

    def to_dict(self) -> dict:
        return {
            "calibration": self.calibration.to_dict(),
            "steps": [{step.name: step.to_dict()} for step in self.steps],
            "export": self.export.to_dict(),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def needs_calibration(self) -> bool:
        return any(step.needs_calibration for step in self.steps)


def parse_step(entry, index: int, source: str) -> Step:
    where = f"steps[{index}]"
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, dict) or len(entry) != 1:
        raise RecipeError(f"{source}: {where}: a step is a one-key mapping like 'rtn: {{bits: 4}}', got {entry!r}")
    ((name, raw),) = entry.items()
    steps = registered_steps()
    if name not in steps:
        raise RecipeError(
            f"{source}: {where}.{name}: unknown step{_did_you_mean(name, steps)}; known steps: {', '.join(steps)}"
        )
    return build_config(steps[name], raw, f"{where}.{name}", source)


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
