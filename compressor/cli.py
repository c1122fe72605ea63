"""The ``compressor`` command: parsing and printing only; the work lives in the library.

Help, ``methods`` and the first check of a recipe answer before torch is imported: the commands
import the toolkit inside their bodies, after the cheap checks."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import click

from compressor.errors import UserError

USER_ERRORS = (UserError, FileNotFoundError, MemoryError)


def fail(error: Exception) -> None:
    """One line on stderr: a user's mistake exits with status 2; anything else is a bug in compressor,
    said as such with where it happened (status 1). ``COMPRESSOR_DEBUG=1`` shows the traceback instead."""
    if os.environ.get("COMPRESSOR_DEBUG"):
        raise error
    if isinstance(error, USER_ERRORS):
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    where = "".join(f"{note.removeprefix('in ')}: " for note in getattr(error, "__notes__", []))
    message = " ".join(str(error).split())
    click.echo(
        f"error: {where}{type(error).__name__}: {message} (an internal error of compressor: COMPRESSOR_DEBUG=1 shows "
        "the traceback)",
        err=True,
    )
    sys.exit(1)


def quiet_transformers() -> None:
    """transformers' own "Loading weights" bars: our progress lines say what runs."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def exit_on_signals() -> None:
    """``kill -TERM`` and Ctrl-C unwind (so a half-written output folder is removed) and exit with the
    shell's status for the signal, 128 + its number (Ctrl-C: 130), not click's 1 for "Aborted!"."""
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, exit_for_signal)


def exit_for_signal(signum, frame) -> None:
    """Unwind and exit; a rank of several that its launcher stops (SIGTERM, after another rank failed) ends at
    once instead: unwinding there can land in a finalizer and print its traceback, and its partial output is
    resumable or removed by the next run either way."""
    if signum == signal.SIGTERM and "WORLD_SIZE" in os.environ:
        os._exit(128 + signum)
    sys.exit(128 + signum)


def rank_failed(error: Exception) -> None:
    """One rank of several failed: a user's error is said by rank 0 alone (every rank meets it); a lost peer is
    said by compressor's launcher, which knows which rank died (under a plain torchrun, by this rank)."""
    from compressor.distributed import LOST_CONTACT, lost_contact

    rank = int(os.environ.get("RANK", "0"))
    if lost_contact(error):
        if "COMPRESSOR_STATUS_DIR" not in os.environ:
            click.echo(f"error: rank {rank} lost contact with another rank: {' '.join(str(error).split())}", err=True)
        sys.exit(LOST_CONTACT)
    if rank != 0 and isinstance(error, USER_ERRORS):
        sys.exit(2)
    if rank != 0:
        error.add_note(f"in rank {rank}")


@click.group()
@click.version_option(package_name="compressor")
def main():
    """Compress large language models with recipes, export them for serving, check them."""


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.argument("model")
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="folder for the compressed checkpoint"
)
@click.option("--overwrite", is_flag=True, help="replace an existing output folder")
@click.option("--device", default="auto", show_default=True, help="cuda, cuda:1, cpu or auto")
@click.option(
    "--offload",
    type=click.Choice(["auto", "yes", "no"]),
    default="auto",
    show_default=True,
    help="model steps: keep blocks in CPU memory and move them to the device one at a time "
    "(auto: when the model does not fit)",
)
@click.option("--trust-remote-code", is_flag=True, help="allow the model's own code from the hub")
@click.option("--quiet", is_flag=True, help="no progress output")
@click.option(
    "--nproc", type=click.IntRange(min=1), help="run on this many processes of this machine (torch.distributed)"
)
@click.option(
    "--backend",
    type=click.Choice(["gloo", "nccl"]),
    help="torch.distributed backend of a run on several processes [default: nccl on GPUs, gloo on the CPU]",
)
@click.option("--resume", is_flag=True, help="continue the interrupted run of --output from its last committed block")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=1800,
    show_default=True,
    help="seconds a process waits for another before the run ends (several processes)",
)
def apply(recipe, model, output, overwrite, device, offload, trust_remote_code, quiet, nproc, backend, resume, timeout):
    """Compress MODEL (hub id, folder or 'demo') with RECIPE and export it to --output."""
    from compressor.recipe import check_recipe_file

    offload = {"auto": None, "yes": True, "no": False}[offload]
    try:
        check_recipe_file(recipe)  # typos answer here, before torch loads
        if nproc is not None and nproc > 1 and "WORLD_SIZE" not in os.environ:
            from compressor.api import launch_apply
            from compressor.distributed import check_distributable
            from compressor.recipe import Recipe

            check_distributable(Recipe.from_yaml(recipe), nproc)  # before any process starts

            options = dict(overwrite=overwrite, device=device, offload=offload, trust_remote_code=trust_remote_code)
            options.update(progress=not quiet, backend=backend, resume=resume, timeout=timeout)
            sys.exit(launch_apply(recipe, model, output, nproc, **options))  # rank 0 says what it wrote
        from compressor.api import apply as apply_recipe
        from compressor.recipe import Recipe

        exit_on_signals()
        quiet_transformers()
        parsed = Recipe.from_yaml(recipe)
        report = apply_recipe(
            parsed,
            model,
            output,
            overwrite=overwrite,
            device=device,
            offload=offload,
            trust_remote_code=trust_remote_code,
            progress=not quiet,
            backend=backend,
            resume=resume,
            timeout=timeout,
        )
    except Exception as error:
        if "WORLD_SIZE" in os.environ:
            rank_failed(error)
        fail(error)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    click.echo(report.table())
    click.echo(f"wrote {output}")
    from compressor.serving import check_checkpoint

    click.echo("serving (compressor check):")
    for verdict in check_checkpoint(output):
        click.echo(f"  {verdict.line()}")


@main.command(name="eval")
@click.argument("model")
@click.option("--base", help="the uncompressed model to compare with (hub id, folder or 'demo')")
@click.option(
    "--text", default="demo", show_default=True, help="held-out text: 'demo', a local file or folder, or a dataset"
)
@click.option("--seq-len", default=512, show_default=True, help="tokens per window")
@click.option("--max-windows", type=int, help="evaluate at most this many windows")
@click.option("--device", default="auto", show_default=True)
@click.option("--tasks", help="comma-separated lm-eval tasks to run as well (needs the eval extra)")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="also write the numbers here")
@click.option(
    "--kv-cache",
    type=click.Choice(["auto", "off"]),
    default="auto",
    show_default=True,
    help="auto: run with the quantized KV cache the export declares (bfp); off: with a full-precision cache",
)
@click.option("--trust-remote-code", is_flag=True, help="allow the model's (and base's) own code from the hub")
@click.option("--quiet", is_flag=True, help="no progress output")
def evaluate(model, base, text, seq_len, max_windows, device, tasks, json_path, kv_cache, trust_remote_code, quiet):
    """Perplexity of MODEL on held-out text, and with --base the gap and the KL divergence."""
    try:
        from compressor.api import resolve_device
        from compressor.eval import evaluate_paths, load_causal_lm, run_lm_eval

        quiet_transformers()
        result = evaluate_paths(
            model,
            base,
            text,
            seq_len,
            max_windows,
            resolve_device(device),
            progress=not quiet,
            kv_cache=kv_cache == "auto",
            trust_remote_code=trust_remote_code,
        )
        numbers = result.to_dict()
        click.echo(result.format(model, base))
        if tasks:
            numbers["tasks"] = run_lm_eval(
                *load_causal_lm(model, device=resolve_device(device), trust_remote_code=trust_remote_code),
                tasks.split(","),
            )
            click.echo(json.dumps(numbers["tasks"], indent=2))
    except Exception as error:
        fail(error)
    if json_path:
        json_path.write_text(json.dumps(numbers, indent=2))


@main.command()
@click.option("--markdown", is_flag=True, help="print the recipe reference as markdown")
def methods(markdown):
    """Every recipe step with its parameters, defaults and one line of help."""
    from compressor.docs import recipe_reference, steps_overview
    from compressor.recipe import shipped_catalogue

    click.echo(recipe_reference(shipped_catalogue()) if markdown else steps_overview(shipped_catalogue()))


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option("--device", default="auto", show_default=True)
@click.option("--text", default="demo", show_default=True, help="held-out text for the perplexity check")
@click.option("--max-layers", type=int, help="check at most this many quantized layers")
@click.option("--no-speed", is_flag=True, help="skip the tokens/s measurement on a GPU")
@click.option("--trust-remote-code", is_flag=True, help="allow the checkpoint's own modeling code")
def validate(checkpoint, device, text, max_layers, no_speed, trust_remote_code):
    """Check an exported CHECKPOINT's kernels against their references (and time them on a GPU)."""
    try:
        from compressor.api import resolve_device
        from compressor.validate import format_validation_report, validate_checkpoint

        result = validate_checkpoint(
            checkpoint,
            device=resolve_device(device),
            text=text,
            max_layers=max_layers,
            speed=False if no_speed else None,
            trust_remote_code=trust_remote_code,
        )
    except Exception as error:
        fail(error)
    click.echo(format_validation_report(result))
    if not result.get("ok", True):
        sys.exit(1)


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--engine", type=click.Choice(["all", "vllm", "transformers"]), default="all", show_default=True)
def check(checkpoint, engine):
    """Say whether each serving engine loads CHECKPOINT, through which path, or exactly why not.

    Exit status 1 when a named engine (or, with all, any engine) cannot load some part."""
    from compressor.serving import ENGINES, check_checkpoint

    try:
        results = check_checkpoint(checkpoint, ENGINES if engine == "all" else (engine,))
    except Exception as error:
        fail(error)
    for verdict in results:
        click.echo(verdict.line())
    if not all(v.loads for v in results):
        sys.exit(1)


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="table to write or merge into (default kernel-configs-<gpu>.json)",
)
@click.option("--m", "batch_sizes", default="1,16,64,256", show_default=True, help="rows of x (tokens) to tune for")
@click.option("--device", default="cuda", show_default=True)
def tune(checkpoint, output, batch_sizes, device):
    """Tune the kernels for an exported CHECKPOINT's own layer shapes on this GPU and write the table.

    Use it with COMPRESSOR_KERNEL_CONFIGS=<table> (it comes before the shipped tables)."""
    import re

    try:
        ms = [int(v) for v in batch_sizes.split(",") if v]
    except ValueError:
        fail(UserError(f"--m {batch_sizes!r}: expected comma-separated numbers of rows, e.g. 1,16,64,256"))
    import torch

    if not torch.cuda.is_available() or not device.startswith("cuda"):
        fail(UserError("compressor tune measures kernels on a CUDA GPU; none is available here"))
    try:
        from compressor.kernel_tuning import tune_checkpoint

        name = torch.cuda.get_device_name(torch.device(device))
        output = output or Path(f"kernel-configs-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}.json")
        summary = tune_checkpoint(checkpoint, output, ms, device, log=click.echo)
    except Exception as error:
        fail(error)
    click.echo(f"wrote {summary['entries']} entries ({summary['shapes']} layer shapes) to {summary['table']}")
    click.echo(f"use it with: COMPRESSOR_KERNEL_CONFIGS={summary['table']}")
