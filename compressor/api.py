"""The Python entry point: ``apply(recipe, model, output)`` does what ``compressor apply`` does."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import AutoTokenizer

from compressor.export import CheckpointWriter, atomic_output_dir
from compressor.export.output import check_free_space
from compressor.model import ModelHandle, transformers_says
from compressor.moe import checkpoint_name
from compressor.pipeline import Session
from compressor.recipe import Recipe
from compressor.report import Report


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def least_export_bytes(handle: ModelHandle, recipe: Recipe, dtype) -> int:
    """The least the checkpoint can take, so a disk below it is refused before any work and no run that
    could fit is: block linears at the fewest bits any quantizer of the recipe uses (2 for one without a
    ``bits`` key), a fifth of them at most removed by a structural step, the rest in the export dtype."""
    bits = [getattr(step, "bits", 2) for step in recipe.steps if step.quantizes_weights]
    fewest = None if recipe.export.format == "dense" or not bits else min(b for b in bits if isinstance(b, int))
    kept = 0.2 if any(step.changes_architecture for step in recipe.steps) else 1.0
    return handle.export_bytes(dtype, fewest, kept)


def apply(
    recipe: Recipe | str | Path,
    model: str | Path,
    output: str | Path,
    *,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    offload: bool | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> Report:
    """Compress ``model`` (hub id, local folder or ``demo``) with ``recipe`` and export to ``output``.

    The input model is only read; the output folder appears only once it is complete. ``offload``
    (model steps only): True keeps the blocks in CPU memory and moves them to the device one at a
    time, False keeps the whole model on the device, None (default) decides by free device memory.
    """
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_yaml(recipe)
    handle = ModelHandle.open(model, trust_remote_code=trust_remote_code)
    tokenizer = None
    if recipe.needs_calibration:
        with transformers_says(handle.path):
            tokenizer = AutoTokenizer.from_pretrained(handle.path, trust_remote_code=trust_remote_code)
    session = Session(handle, recipe, tokenizer, resolve_device(device), progress=progress, offload=offload)
    check_free_space(output, least_export_bytes(handle, recipe, session.export_dtype))
    with atomic_output_dir(output, overwrite=overwrite, protected=[handle.path]) as directory:
        writer = CheckpointWriter(
            directory, recipe.export, session.export_dtype, functools.partial(checkpoint_name, handle.adapter)
        )
        report = session.run(sink=writer)
        writer.finish(handle, recipe, report, session.run_state.export)
    return report
