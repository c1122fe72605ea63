"""Each finished block committed inside the run's partial output, so that ``--resume`` continues a run a crash, a
kill or a lost machine interrupted.

The partial output (``.NAME.partial-PID``, ``export/output.py``) gets a ``resume/`` folder:

* ``fingerprint.json``: what the run's result depends on: the package version, the recipe's steps and export
  settings, its calibration settings, the model's files (names, sizes, safetensors headers and config) and the
  number of processes (which decides each rank's share of the samples). ``--resume`` refuses, in one line
  naming what changed, a partial output whose fingerprint differs;
* ``block-K.pt``: block K as compressed (the whole module, written by the rank that writes the checkpoint);
* ``rank-R-K.pt``: what rank R needs to go on after block K: its share of the inputs of block K+1, the
  steps' run states (Block-AP's full-precision chain), the report so far and the export declarations;
* ``rank-R-kwargs.pt``: the keyword arguments rank R's batches hand each block (masks, rotary embeddings),
  written once: they do not change during a run;
* ``committed.json``: the last block every rank has committed (written after a barrier, atomically).

Resuming replays blocks 0..K from their files into a fresh checkpoint writer, so the shards come out
byte-identical to an uninterrupted run's, and continues at block K+1 with the committed inputs.

Only a recipe that is one layer pass (its steps all ``kind = "layer"``) commits blocks. A model step that trains
(E2E-QP, SwiftKV, TransMLA's healing: ``distill.train_end_to_end``) commits its own progress instead:

* ``progress-N.pt`` (N: the run's N-th training phase): the optimizer steps taken, their losses, the trained
  tensors, the optimizer's state and the held-out record, written by the writing rank after an epoch and after
  any step once ``every_seconds`` have passed since the last commit (every rank's training state is the same).

``--resume`` then runs the steps before the training phase again (the fingerprint guarantees the same recipe,
model and data, so they give the same model) and the phase continues after its last committed step. SqueezeLLM's
Fisher pass commits nothing: ``--resume`` says that it runs again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from pathlib import Path

import torch

from compressor.errors import UserError

FOLDER = "resume"


class ResumeError(UserError):
    pass


def model_fingerprint(path: Path) -> str:
    """A hash of the model's config and of each safetensors file's name, size and header (its tensors' names,
    dtypes, shapes and offsets): cheap on a 140 GB model, and it changes when the weights' layout does."""
    digest = hashlib.sha256()
    for file in sorted(Path(path).glob("*.safetensors")):
        digest.update(f"{file.name}:{file.stat().st_size}:".encode())
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            digest.update(handle.read(min(length, 100_000_000)))
    config = Path(path) / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    return digest.hexdigest()[:16]


def fingerprint(recipe, model_path: Path, world_size: int) -> dict:
    from compressor.version import __version__

    settings = recipe.to_dict()
    return {
        "package version": __version__,
        "recipe": {"steps": settings["steps"], "export": settings["export"]},
        "calibration settings": settings["calibration"],
        "model files": model_fingerprint(model_path),
        "processes": world_size,
    }


def differences(old: dict, new: dict) -> list[str]:
    """What changed between two fingerprints, one short phrase per field."""
    changed = []
    for key in new:
        before, after = old.get(key), new[key]
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict) and key == "calibration settings":
            keys = [k for k in after if before.get(k) != after.get(k)]
            changed.append(f"{key} ({', '.join(f'{k}: {before.get(k)} -> {after[k]}' for k in keys)})")
        elif isinstance(before, (str, int)) and isinstance(after, (str, int)) and key != "model files":
            changed.append(f"{key} ({before} -> {after})")
        else:
            changed.append(key)
    return changed


def write_atomically(path: Path, save) -> None:
    temporary = path.with_name(f"{path.name}.tmp")
    save(temporary)
    os.replace(temporary, path)


class Commits:
    """The commit point of one run, in its partial output ``directory`` (shared by every rank)."""

    every_seconds = 600.0  # a training phase commits its progress at most this often (and after every epoch)

    def __init__(self, directory: Path, fingerprint: dict, distributed):
        self.folder = Path(directory) / FOLDER
        self.fingerprint = fingerprint
        self.distributed = distributed
        self.resuming = False  # (known to the writing rank: the one that says where a phase continues)
        self.phases: list[int] = []  # ids of the training phases' steps, in the order they ran
        self.last_progress = time.monotonic()

    # --- opening (the writing rank) -------------------------------------------------------------

    def last_committed(self) -> int:
        """The last block committed in this folder; -1 when none."""
        path = self.folder / "committed.json"
        return json.loads(path.read_text())["block"] if path.is_file() else -1

    def open(self, output: Path, resuming: bool) -> int:
        """Check a partial output being resumed and return its last committed block (-1: start from block 0);
        record the fingerprint of a new run."""
        if resuming and (self.folder / "fingerprint.json").is_file():
            old = json.loads((self.folder / "fingerprint.json").read_text())
            changed = differences(old, self.fingerprint)
            if changed:
                raise ResumeError(
                    f"{output}: cannot resume: {'; '.join(changed)} changed since the interrupted run; run without "
                    "--resume to start over"
                )
            for path in self.folder.parent.iterdir():  # what the interrupted run wrote besides its commits
                if path != self.folder:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            self.resuming = True
            return self.last_committed()
        self.folder.mkdir(exist_ok=True)
        (self.folder / "fingerprint.json").write_text(json.dumps(self.fingerprint, indent=2))
        return -1

    # --- committing (every rank) ----------------------------------------------------------------

    def commit(self, index: int, block, inputs, kwargs, run_state, steps) -> None:
        """Block ``index`` is finished and ``inputs`` are this rank's inputs of block ``index + 1``."""
        rank = self.distributed.rank
        # the blocks' keyword arguments (masks, rotary embeddings) never change during a run: written once
        if not (self.folder / f"rank-{rank}-kwargs.pt").is_file():
            write_atomically(self.folder / f"rank-{rank}-kwargs.pt", lambda path: torch.save(kwargs, path))
        state = {
            "inputs": inputs,
            "step_states": [run_state.step_states.get(id(step), {}) for step in steps],
            "report": run_state.report,
            "export": run_state.export,
        }
        write_atomically(self.folder / f"rank-{rank}-{index}.pt", lambda path: torch.save(state, path))
        if self.distributed.writes:
            write_atomically(self.folder / f"block-{index}.pt", lambda path: torch.save(block, path))
        self.distributed.barrier()
        if self.distributed.writes:
            write_atomically(self.folder / "committed.json", lambda path: path.write_text(json.dumps({"block": index})))
        # the state of block index - 1 stays until every rank is past this commit; older ones go
        (self.folder / f"rank-{rank}-{index - 2}.pt").unlink(missing_ok=True)

    def restore(self, index: int, run_state, steps, device) -> tuple[list, list]:
        """This rank's state after block ``index``: the report, step states and declarations go back into
        ``run_state``; returns the inputs and keyword arguments of block ``index + 1``."""
        rank = self.distributed.rank
        state = torch.load(self.folder / f"rank-{rank}-{index}.pt", map_location=device, weights_only=False)
        kwargs = torch.load(self.folder / f"rank-{rank}-kwargs.pt", map_location=device, weights_only=False)
        report = run_state.report
        report.rows[:], report.warnings[:] = state["report"].rows, state["report"].warnings
        run_state.export = state["export"]
        for step, step_state in zip(steps, state["step_states"]):
            run_state.state_of(step).update(step_state)
        return state["inputs"], kwargs

    # --- a training phase's progress ---------------------------------------------------------------

    def progress_path(self, step) -> Path:
        """Where the training phase of ``step`` commits (numbered by the order the phases run in)."""
        if id(step) not in self.phases:
            self.phases.append(id(step))
        return self.folder / f"progress-{self.phases.index(id(step))}.pt"

    def committed_progress(self, step, device) -> dict | None:
        """The last progress the training phase of ``step`` committed; None when it has committed none."""
        path = self.progress_path(step)
        return torch.load(path, map_location=device, weights_only=False) if path.is_file() else None

    def commit_progress(self, step, state, force: bool = False) -> None:
        """Commit ``state()`` (every rank's training state: the same) when ``force`` (an epoch ended) or when
        ``every_seconds`` have passed since the last commit; only the writing rank writes."""
        if not force and time.monotonic() - self.last_progress < self.every_seconds:
            return
        if self.distributed.writes:
            write_atomically(self.progress_path(step), lambda path: torch.save(state(), path))
        self.last_progress = time.monotonic()

    def committed_block(self, index: int, device):
        return torch.load(self.folder / f"block-{index}.pt", map_location=device, weights_only=False)

    def finish(self) -> None:
        """The run is complete: the commit folder leaves the output."""
        shutil.rmtree(self.folder, ignore_errors=True)
