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
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
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
    if len(choices) > 2 and all(isinstance(c, int) for c in choices) and choices == list(range(choices[0], choices[-1] + 1)):
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
    words = [f"a list of {plural[alt[5:-1]]}" if alt.startswith("list[") else names[alt] for alt in spec if alt != "null"]
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


def _did_you_mean(word: str, options) -> str:
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
        specs.append({
            "key": f.name,
            "type": type_spec(hints[f.name]),
            "default": f.default if f.default is not dataclasses.MISSING else f.default_factory(),
            "help": f.metadata.get("help", ""),
            "choices": None if choices is None else list(choices),
            "min": f.metadata.get("min"),
            "max": f.metadata.get("max"),
        })
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
            raise RecipeError(f"{source}: {where}.{key}: unknown key{_did_you_mean(key, by_key)}; allowed: {allowed}")
    for key, value in raw.items():
        spec = by_key[key]
        if not _matches_type(value, spec["type"]):
            raise RecipeError(f"{source}: {where}.{key}: {value!r} is not {_type_name(spec['type'])}")
        if spec["choices"] is not None and value not in spec["choices"]:
            raise RecipeError(f"{source}: {where}.{key}: {value!r} is not one of {describe_choices(spec['choices'])}")
        if spec["min"] is not None and value is not None and value < spec["min"]:
            raise RecipeError(f"{source}: {where}.{key}: {value!r} is below the minimum {spec['min']}")
        if spec["max"] is not None and value is not None and value > spec["max"]:
            raise RecipeError(f"{source}: {where}.{key}: {value!r} is above the maximum {spec['max']}")
    return {k: (float(v) if "float" in by_key[k]["type"] and isinstance(v, int) and not isinstance(v, bool) else v) for k, v in raw.items()}


def build_config(cls, raw, where: str, source: str):
    """Validate ``raw`` (a mapping from YAML) against dataclass ``cls`` and build it."""
    return _construct(cls, check_keys(raw, param_specs(cls), where, source), where, source)


def _construct(cls, values: dict, where: str, source: str):
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

    def check(self) -> None:
        # A local path that does not exist is a mistake whether or not a step needs the data; checked
        # here so it is not taken for a hub dataset name (minutes of network retries offline).
        if looks_local(self.dataset) and not Path(self.dataset).exists():
            raise ValueError(f"dataset: {self.dataset}: no such file or folder")


DATA_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def looks_local(dataset: str) -> bool:
    """A calibration source that is a path, not a hub dataset name: a data file's suffix, or a path's start."""
    return Path(dataset).suffix in DATA_FILE_SUFFIXES or dataset.startswith((".", "/", "~"))


@dataclass
class ExportConfig(Config):
    format: str = param("auto", "checkpoint format (auto: compressed-tensors for uniform weights, compressor for lookup tables)",
                        choices=("auto", "compressed-tensors", "compressor", "dense"))
    dtype: str = param("auto", "dtype of unquantized tensors and scales", choices=("auto", "float16", "bfloat16", "float32"))
    max_shard_size: str = param("5GB", "largest safetensors shard, e.g. 2GB or 500MB")

    def check(self) -> None:
        try:
            parse_size(self.max_shard_size)
        except ValueError as error:
            raise ValueError(f"max_shard_size: {error}") from None


UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B)\s*", str(text).upper())
    if not match:
        raise ValueError(f"{text!r} is not a size like 2GB or 500MB")
    return int(float(match.group(1)) * UNITS[match.group(2)])


SECTIONS = ("calibration", "steps", "export")


@dataclass
class Recipe:
    steps: list[Step] = field(default_factory=list)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    source: str = "<recipe>"

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        return cls.from_dict(read_recipe_yaml(path), source=str(path))

    @classmethod
    def from_dict(cls, data, source: str = "<recipe>") -> Recipe:
        steps = registered_steps()
        checked = check_recipe(data, source, catalogue())
        return cls(
            steps=[_construct(steps[name], values, where, source) for where, name, values in checked["steps"]],
            calibration=_construct(CalibrationConfig, checked["calibration"], "calibration", source),
            export=_construct(ExportConfig, checked["export"], "export", source),
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


def read_recipe_yaml(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise RecipeError(f"{path}: {where}not valid YAML ({getattr(error, 'problem', error)})") from None


def check_recipe(data, source: str, catalogue: dict) -> dict:
    """Check a recipe's sections, steps and keys against a catalogue (see ``catalogue``), without
    the step classes. Returns ``{"steps": [(where, name, values)], "calibration": values, "export": values}``."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with the sections {', '.join(SECTIONS)}")
    for key in data:
        if key not in SECTIONS:
            raise RecipeError(f"{source}: {key}: unknown section{_did_you_mean(key, SECTIONS)}; allowed: {', '.join(SECTIONS)}")
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise RecipeError(f"{source}: steps: expected a non-empty list of steps, got {raw_steps!r}")
    known = catalogue["steps"]
    steps = []
    for index, entry in enumerate(raw_steps):
        where = f"steps[{index}]"
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise RecipeError(f"{source}: {where}: a step is a one-key mapping like 'rtn: {{bits: 4}}', got {entry!r}")
        ((name, raw),) = entry.items()
        if name not in known:
            raise RecipeError(f"{source}: {where}.{name}: unknown step{_did_you_mean(name, known)}; known steps: {', '.join(known)}")
        steps.append((f"{where}.{name}", name, check_keys(raw, known[name]["params"], f"{where}.{name}", source)))
    sections = {name: check_keys(data.get(name), specs, name, source) for name, specs in catalogue["sections"].items()}
    return {"steps": steps, **sections}


# ----------------------------------------------------------------------------------------------
# The catalogue: every section's and step's keys as plain data. ``compressor methods`` and the
# command line's first check of a recipe read the copy shipped in recipe_catalog.json, so they answer
# without importing torch (which every method module needs); a test keeps that copy equal to the
# registry, and ``python scripts/update_readme.py`` rewrites it.

CATALOGUE_FILE = Path(__file__).with_name("recipe_catalog.json")


def catalogue() -> dict:
    """The live catalogue, from the registered step classes."""
    return {
        "sections": {"calibration": param_specs(CalibrationConfig), "export": param_specs(ExportConfig)},
        "steps": {
            name: {"kind": cls.kind, "needs_calibration": cls.needs_calibration, "summary": cls.summary(), "params": param_specs(cls)}
            for name, cls in registered_steps().items()
        },
    }


def shipped_catalogue() -> dict:
    import json

    return json.loads(CATALOGUE_FILE.read_text())


def check_recipe_file(path: str | Path) -> None:
    """The fast check of a recipe file against the shipped catalogue (sections, steps, keys, types
    and ranges); the cross-key checks of each step run when the recipe is built."""
    check_recipe(read_recipe_yaml(path), str(path), shipped_catalogue())


def reference_rows(specs: list[dict]) -> list[tuple[str, str, str]]:
    """(key, default, help) rows for one step or section: ``compressor methods`` and the README."""
    rows = []
    for spec in specs:
        help_text = spec["help"]
        if spec["choices"] is not None:
            help_text += f" ({describe_choices(spec['choices'])})"
        shown = yaml.safe_dump(spec["default"], default_flow_style=True).removesuffix("...\n").strip()
        rows.append((spec["key"], shown, f"{help_text} [{_type_name(spec['type'])}]"))
    return rows
