"""Recipes: YAML <-> typed objects.

A recipe is three sections::

    calibration: {dataset: demo, samples: 128, seq_len: 512, seed: 0}
    steps:
      - rtn: {bits: 4, group_size: 128, symmetric: false, ignore: [lm_head]}
    export: {format: auto}

Every step is a dataclass registered with ``@register_step("name")`` (``compressor.step``); its
fields, declared with ``param(...)``, are the recipe keys, with their defaults, allowed values and
one line of help. The same declarations drive validation, ``compressor methods`` and the recipe
reference (docs/RECIPES.md); the method modules are listed in ``compressor.methods``.

Validation is strict: unknown sections, steps and keys are errors (with a did-you-mean), and every
error is one line naming the file, the step and the key, e.g.
``recipes/x.yaml: steps[0].rtn.bits: 9 is not one of 2..8``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from compressor.data_files import looks_local
from compressor.methods import registered_steps
from compressor.step import (
    Config,
    RecipeError,
    Step,
    build_config,
    check_keys,
    construct,
    did_you_mean,
    param,
    param_specs,
    reference_rows,
    register_step,
    shown,
)

__all__ = [
    "CalibrationConfig",
    "ExportConfig",
    "Recipe",
    "RecipeError",
    "Step",
    "build_config",
    "catalogue",
    "check_recipe",
    "param",
    "reference_rows",
    "register_step",
]


# ----------------------------------------------------------------------------------------------
# The recipe


@dataclass
class CalibrationConfig(Config):
    dataset: str = param(
        "demo", "calibration text: 'demo', a local .txt/.jsonl/.parquet file or folder, or a datasets name"
    )
    samples: int = param(128, "number of calibration sequences", min=1)
    seq_len: int = param(512, "tokens per calibration sequence", min=8)
    seed: int = param(0, "seed for choosing the sequences")
    split: str = param("train", "dataset split (datasets names only)")
    text_column: str = param("text", "column holding the text (jsonl, parquet and datasets names)")
    expert_calibration: str = param(
        "routed",
        "mixture-of-experts: experts see the tokens routed to them (routed), or every token for statistics (all)",
        choices=("routed", "all"),
    )
    min_expert_tokens: int = param(
        16, "mixture-of-experts: an expert routed fewer calibration tokens than this is named in a warning", min=0
    )

    def check(self) -> None:
        # A local path that does not exist is a mistake whether or not a step needs the data; checked
        # here so it is not taken for a hub dataset name (minutes of network retries offline).
        if looks_local(self.dataset) and not Path(self.dataset).exists():
            raise ValueError(f"dataset: {self.dataset}: no such file or folder")


@dataclass
class ExportConfig(Config):
    format: str = param(
        "auto",
        "checkpoint format (auto: compressed-tensors for uniform weights but GPTQ for asymmetric 2/3-bit ones, "
        "compressor for lookup tables)",
        choices=("auto", "compressed-tensors", "gptq", "compressor", "dense"),
    )
    dtype: str = param(
        "auto", "dtype of unquantized tensors and scales", choices=("auto", "float16", "bfloat16", "float32")
    )
    max_shard_size: str = param("5GB", "largest safetensors shard, e.g. 2GB or 500MB")

    def check(self) -> None:
        try:
            size = parse_size(self.max_shard_size)
        except ValueError as error:
            raise ValueError(f"max_shard_size: {error}") from None
        if size < SMALLEST_SHARD:
            raise ValueError(f"max_shard_size: {self.max_shard_size!r} is below 1KB (one shard per tensor)")

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)


SMALLEST_SHARD = 1000  # bytes: below it every tensor would be a shard of its own
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' -> bytes."""
    match = re.fullmatch(r"\s*(\d{1,15}(?:\.\d{1,15})?)\s*([KMG]?I?B)\s*", str(text).upper())
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
            steps=[construct(steps[name], values, where, source) for where, name, values in checked["steps"]],
            calibration=construct(CalibrationConfig, checked["calibration"], "calibration", source),
            export=construct(ExportConfig, checked["export"], "export", source),
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
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(f"{path}: not UTF-8 text (byte {error.start}); save the recipe as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = " ".join(str(getattr(error, "problem", None) or error).split())
        raise RecipeError(f"{path}: {where}not valid YAML ({shown(problem)})") from None
    except ValueError as error:  # an integer with more digits than Python converts
        raise RecipeError(f"{path}: not a recipe ({shown(str(error))})") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to be a recipe") from None


def check_recipe(data, source: str, catalogue: dict) -> dict:
    """Check a recipe's sections, steps and keys against a catalogue (see ``catalogue``), without
    the step classes. Returns ``{"steps": [(where, name, values)], "calibration": values, "export": values}``."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with the sections {', '.join(SECTIONS)}")
    for key in data:
        if key not in SECTIONS:
            raise RecipeError(
                f"{source}: {key}: unknown section{did_you_mean(key, SECTIONS)}; allowed: {', '.join(SECTIONS)}"
            )
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
            raise RecipeError(
                f"{source}: {where}.{name}: unknown step{did_you_mean(name, known)}; known steps: {', '.join(known)}"
            )
        steps.append((f"{where}.{name}", name, check_keys(raw, known[name]["params"], f"{where}.{name}", source)))
    sections = {name: check_keys(data.get(name), specs, name, source) for name, specs in catalogue["sections"].items()}
    return {"steps": steps, **sections}


# ----------------------------------------------------------------------------------------------
# The catalogue: every section's and step's keys as plain data. ``compressor methods`` and the
# command line's first check of a recipe read the copy shipped in recipe_catalog.json, so they answer
# without importing torch (which every method module needs); a test keeps that copy equal to the
# registry, and ``python scripts/update_docs.py`` rewrites it.

CATALOGUE_FILE = Path(__file__).with_name("recipe_catalog.json")


def catalogue() -> dict:
    """The live catalogue, from the registered step classes."""
    return {
        "sections": {"calibration": param_specs(CalibrationConfig), "export": param_specs(ExportConfig)},
        "steps": {
            name: {
                "kind": cls.kind,
                "needs_calibration": cls.needs_calibration,
                "summary": cls.summary(),
                "params": param_specs(cls),
                "families": None if cls.families is None else list(cls.families),
                "native_format": writes_native_format(cls()),
            }
            for name, cls in registered_steps().items()
        },
        "families": architecture_families(),
    }


def writes_native_format(step) -> bool:
    """Whether ``step`` (with its settings) writes our native format: weights no compressed-tensors layout
    holds, or a quantized KV cache (``pipeline.check_family`` refuses it on families without a native type)."""
    return bool(step.declares_kv_cache or (step.quantizes_weights and not step.writes_plain_uniform))


def architecture_families() -> list[dict]:
    """Each family of ``compressor.arch.ADAPTERS``: its name, how its block differs from Llama's, and whether
    our native format has a model type for it (the support matrix of ``compressor methods``)."""
    from compressor.arch import ADAPTERS
    from compressor.arch.shipped import architecture

    native = architecture("native")
    return [
        {"family": a.family, "differs": list(a.differs), "native_format": native.model_type_for(a.family) is not None}
        for a in ADAPTERS
    ]


def shipped_catalogue() -> dict:
    import json

    return json.loads(CATALOGUE_FILE.read_text())


def check_recipe_file(path: str | Path) -> None:
    """The fast check of a recipe file against the shipped catalogue (sections, steps, keys, types
    and ranges); the cross-key checks of each step run when the recipe is built."""
    check_recipe(read_recipe_yaml(path), str(path), shipped_catalogue())
