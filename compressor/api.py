"""The Python entry point: ``apply(recipe, model, output)`` does what ``compressor apply`` does."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from compressor.export import CheckpointWriter, atomic_output_dir
from compressor.model import ModelHandle, transformers_says
from compressor.pipeline import Session
from compressor.recipe import Recipe
from compressor.report import Report


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    with atomic_output_dir(output, overwrite=overwrite, protected=[handle.path]) as directory:
        writer = CheckpointWriter(directory, recipe.export, session.export_dtype)
        report = session.run(sink=writer)
        writer.finish(handle, recipe, report, session.run_state.export)
    return report
