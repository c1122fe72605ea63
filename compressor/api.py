"""The Python entry point: ``apply(recipe, model, output)`` does what ``compressor apply`` does."""

from __future__ import annotations

import functools
import json
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch
from transformers import AutoTokenizer

from compressor.distributed import (
    DEFAULT_TIMEOUT,
    Distributed,
    DistributedError,
    check_distributable,
    launch,
    under_launcher,
)
from compressor.export import CheckpointWriter, atomic_output_dir
from compressor.export.output import check_free_space
from compressor.model import ModelHandle, transformers_says
from compressor.moe import checkpoint_name
from compressor.pipeline import Session, one_layer_pass, resumable
from compressor.recipe import Recipe
from compressor.report import Report, peak_memory
from compressor.resume import Commits, fingerprint


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
    nproc: int | None = None,
    backend: str | None = None,
    resume: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> Report:
    """Compress ``model`` (hub id, local folder or ``demo``) with ``recipe`` and export to ``output``.

    The input model is only read; the output folder appears only once it is complete. ``offload``
    (model steps only): True keeps the blocks in CPU memory and moves them to the device one at a
    time, False keeps the whole model on the device, None (default) decides by free device memory.

    ``nproc`` > 1 runs the recipe on that many processes of this machine (``compressor/distributed.py``:
    samples split across them; ``backend`` gloo or nccl, default nccl on GPUs, gloo on the CPU; ``timeout``
    seconds bound the wait for a rank); a process torchrun started joins its run by itself. ``resume``
    continues the interrupted run of ``output`` from its last committed block (``compressor/resume.py``).
    """
    if nproc is not None and nproc > 1 and not under_launcher():
        options = dict(overwrite=overwrite, device=device, offload=offload, trust_remote_code=trust_remote_code)
        options.update(progress=progress, backend=backend, resume=resume, timeout=timeout)
        check_distributable(recipe if isinstance(recipe, Recipe) else Recipe.from_yaml(recipe), nproc)
        with tempfile.TemporaryDirectory(prefix="compressor-") as folder:
            if isinstance(recipe, Recipe):
                path = Path(folder) / "recipe.yaml"
                path.write_text(recipe.to_yaml())
                recipe = path
            status = launch_apply(recipe, model, output, nproc, **options)
        if status:
            raise DistributedError(f"{output}: the run on {nproc} processes failed (exit status {status})")
        return Report.from_dict(json.loads((Path(output) / "report.json").read_text()))
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_yaml(recipe)
    distributed = Distributed.from_environment(backend, timeout)
    try:
        return apply_here(
            recipe, model, output, distributed, overwrite, device, offload, trust_remote_code, progress, resume
        )
    finally:
        distributed.close()


def launch_apply(recipe, model, output, nproc: int, **options) -> int:
    """``compressor apply`` on ``nproc`` processes of this machine (torch's launcher); returns the exit status."""
    arguments = ["apply", str(recipe), str(model), "-o", str(output)]
    for flag in ("overwrite", "trust_remote_code", "resume"):
        if options.get(flag):
            arguments.append(f"--{flag.replace('_', '-')}")
    if not options.get("progress", True):
        arguments.append("--quiet")
    offload = options.get("offload")
    arguments += ["--offload", {None: "auto", True: "yes", False: "no"}[offload]]
    arguments += ["--device", str(options.get("device") or "auto"), "--timeout", str(options.get("timeout"))]
    if options.get("backend"):
        arguments += ["--backend", options["backend"]]
    with tempfile.TemporaryDirectory(prefix="compressor-ranks-") as status_dir:
        return launch(arguments, nproc, Path(status_dir))


class DiscardSink:
    """Where the blocks of a rank that does not write the checkpoint go."""

    def write_module(self, prefix: str, module) -> None:
        pass


def apply_here(
    recipe: Recipe,
    model,
    output,
    distributed: Distributed,
    overwrite: bool,
    device,
    offload,
    trust_remote_code: bool,
    progress: bool,
    resume: bool,
) -> Report:
    """``apply`` in this process, alone or as one rank of a run (only rank 0 writes the output)."""
    handle = ModelHandle.open(model, trust_remote_code=trust_remote_code)
    tokenizer = None
    if recipe.needs_calibration:
        with transformers_says(handle.path):
            tokenizer = AutoTokenizer.from_pretrained(handle.path, trust_remote_code=trust_remote_code)
    session = Session(
        handle,
        recipe,
        tokenizer,
        distributed.device(resolve_device(device)),
        progress=progress and distributed.writes,
        offload=offload,
        distributed=distributed,
    )
    if not distributed.writes:
        directory, resume_from = distributed.broadcast_object(None, 0)
        if directory is None:
            raise DistributedError(resume_from)  # rank 0 refused the output, and said why
        session.commits, session.resume_from = Commits(Path(directory), {}, distributed), resume_from
        session.run(sink=DiscardSink())
        distributed.gather(rank_numbers(session))  # rank 0 puts the output in place after every rank is done
        return session.report
    can_resume = resumable(recipe.steps)
    if resume:
        restarting = [step.name for step in recipe.steps if step.kind == "model" and not step.commits_progress]
        if restarting:
            print(
                f"resume: model step {', '.join(restarting)} does not commit its progress; "
                + ("it runs again" if can_resume else "starting from the beginning"),
                file=sys.stderr,
            )
    stack = ExitStack()
    try:
        check_free_space(output, least_export_bytes(handle, recipe, session.export_dtype))
        directory = stack.enter_context(
            atomic_output_dir(output, overwrite=overwrite, protected=[handle.path], resume=resume and can_resume)
        )
        if can_resume:
            session.commits = Commits(directory, fingerprint(recipe, handle.path, distributed.world_size), distributed)
            session.resume_from = session.commits.open(Path(output), resume)
    except BaseException as error:
        distributed.broadcast_object((None, str(error)), 0)
        stack.__exit__(type(error), error, error.__traceback__)
        raise
    distributed.broadcast_object((str(directory), session.resume_from), 0)
    with stack:
        if resume and one_layer_pass(recipe.steps):  # (a training phase says itself where it continues)
            report_resume(output, session.resume_from, len(handle.blocks))
            session.report.summary["resumed_after_block"] = session.resume_from
        elif resume and can_resume and not session.commits.resuming:
            print(f"resume: no interrupted run of {output} to continue; starting from the beginning", file=sys.stderr)
        # a dense export of a checkpoint with fused experts keeps transformers 5's names and layout (compressor/moe.py)
        fused = handle.fused_experts and recipe.export.format == "dense"
        rename = None if fused else functools.partial(checkpoint_name, handle.adapter)
        writer = CheckpointWriter(
            directory, recipe.export, session.export_dtype, rename, fused_experts=fused, gptq_first=session.gptq_first()
        )
        report = session.run(sink=writer)
        ranks = distributed.gather(rank_numbers(session))
        if distributed.active:
            report.summary["distributed"] = {
                "processes": distributed.world_size,
                "backend": distributed.backend,
                "ranks": ranks,
                "owners": dict(distributed.owners),  # module (or decomposition) -> the rank that solved it
            }
        if session.commits is not None:
            session.commits.finish()
        writer.finish(handle, recipe, report, session.run_state.export)
    return report


def rank_numbers(session: Session) -> dict:
    """What one rank spent: peak memory, bytes of calibration activations it held, bytes it communicated."""
    return {
        **{k: round(v, 4) for k, v in peak_memory(session.device).items()},
        "calibration_activation_bytes": session.activation_bytes,
        "bytes_moved": session.distributed.bytes_moved,
    }


def report_resume(output, last: int, blocks: int) -> None:
    """Say where a resumed run continues."""
    if last < 0:
        line = f"resume: no committed block of an interrupted run of {output}; starting from block 0"
    else:
        line = f"resume: {output}: blocks 0..{last} were committed; continuing at block {last + 1} of {blocks}"
    print(line, file=sys.stderr)
