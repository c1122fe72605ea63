"""One run on several processes: plain ``torch.distributed`` (c10d) underneath, ``torch.distributed.run`` launching.

``compressor apply ... --nproc N`` starts N processes on this machine through torch's own launcher (the
elastic agent of ``torchrun``, run in this process: ``launch``); ``torchrun --nnodes M --nproc-per-node N -m
compressor apply ...`` runs the same code on several machines. Each process finds its rank in the
environment torchrun sets (``Distributed.from_environment``): gloo on the CPU, NCCL on GPUs (one GPU per
local rank), ``--backend`` to override. Without a launcher the run is one process and nothing here does any
communication: a ``Distributed()`` of world size 1 answers every call locally.

What the processes share, and how (the step classes declare which with ``distributes``; a data-dependent
step that declares nothing refuses ``--nproc > 1`` before any work):

* samples: the calibration sequences are split across ranks (``shard``), so each rank holds only its
  share of every block's inputs and outputs; every rank maps the safetensors and loads only the current
  block, as a single process does;
* ``"sums"``: statistics that are sums over tokens (GPTQ's Hessians, SqueezeLLM's Fisher diagonals, MoDeGPT's
  correlations, TransMLA's key/value Grams) are
  reduced to the module's owner (``solve_owned``), which solves and broadcasts the result; owners are
  balanced by solve cost (``balance_owners``, longest solve first onto the least loaded rank) so the solves
  run in parallel; small sums every rank needs (AWQ's mean |x| and per-alpha errors) are all-reduced;
* ``"gradients"``: a trained block (Block-AP, QLLM's error correction: ``training.train_block``) and the whole
  model (E2E-QP, SwiftKV, TransMLA's healing: ``distill.train_end_to_end``) take the single process's steps over
  every rank's samples (``rows_of_everyone``): each rank runs the samples of a step it holds, weighted by their
  share of the step, and the gradients are summed (``sum_gradients``), as are the losses and held-out losses
  (``all_reduce_sum``), so all ranks take the same optimizer steps and keep the same state;
* ``"ranges"``: per-channel statistics every rank needs whole (BFP's K-sort: sums of squares and maxima of the
  keys; QLLM's channel magnitudes; the FP8 KV cache's maxima) are all-reduced (``all_reduce_sum``,
  ``all_reduce_max``), and every rank computes the same result;
* a sample of tokens that a search runs on (AWQ's clip search, BFP's greedy refinement) travels as a
  ``RowSample``: each rank fills its own tokens' rows of a zero buffer, and the sum over ranks (to an owner, or
  to all) is the single process's sample exactly;
* data-free steps (RTN) need no declaration: every rank computes the same block.

Only rank 0 writes the checkpoint. Every collective counts the bytes it moved (``bytes_moved``).
"""

from __future__ import annotations

import ctypes
import io
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

from compressor.errors import UserError

DISTRIBUTES = ("sums", "gradients", "ranges")  # what a data-dependent step may declare (None: refuses --nproc > 1)
DEFAULT_TIMEOUT = 1800  # seconds one collective may wait for a rank (a hang ends the run after this)
LOST_CONTACT = 3  # exit status of a rank whose collective failed: another rank died or hung


class DistributedError(UserError):
    pass


@dataclass
class Distributed:
    """This process's place in the run: rank, world size, backend; world size 1 is a plain single process."""

    rank: int = 0
    world_size: int = 1
    backend: str | None = None
    local_rank: int = 0
    bytes_moved: int = 0  # bytes this rank sent or received in collectives
    owners: dict[str, int] = field(default_factory=dict)  # module -> rank that solved it (``solve_owned``)
    status_file: Path | None = None  # where this rank says what it is doing (read by ``launch`` on a failure)

    @classmethod
    def from_environment(cls, backend: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> Distributed:
        """The run torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR...), its process group
        started; a single process when there is none."""
        import torch.distributed as dist

        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        end_with_parent()
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        status = os.environ.get("COMPRESSOR_STATUS_DIR")
        rank = dist.get_rank()
        return cls(
            rank,
            dist.get_world_size(),
            backend,
            local_rank,
            status_file=Path(status) / f"rank-{rank}" if status else None,
        )

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def writes(self) -> bool:
        """Whether this rank writes the checkpoint (rank 0)."""
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """The compute device of this rank: its own GPU (cuda:LOCAL_RANK) when it runs on GPUs, else ``requested``."""
        if self.backend == "nccl" or (self.active and requested.type == "cuda"):
            return torch.device("cuda", self.local_rank)
        return requested

    @property
    def communication_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def close(self) -> None:
        import torch.distributed as dist

        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    def doing(self, what: str) -> None:
        """Say what this rank is doing now (the launcher names it if the rank dies)."""
        if self.status_file is not None:
            self.status_file.write_text(what)

    # --- samples --------------------------------------------------------------------------------

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's share of ``rows`` (calibration sequences): contiguous, sizes differing by at most one."""
        if not self.active:
            return rows
        if len(rows) < self.world_size:
            raise DistributedError(
                f"calibration: {len(rows)} samples cannot be split over {self.world_size} processes; use more samples "
                "or fewer processes"
            )
        return rows.tensor_split(self.world_size)[self.rank]

    # --- collectives ----------------------------------------------------------------------------

    def _on_wire(self, tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
        device = self.communication_device
        return (tensor, False) if tensor.device == device else (tensor.to(device), True)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place on every rank."""
        return self._all_reduce(tensor, "SUM")

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Largest value over ranks, elementwise, in place (ranges); ``all_reduce_max(-x)`` is the minimum."""
        return self._all_reduce(tensor, "MAX")

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        if self.active:
            import torch.distributed as dist

            wire, moved = self._on_wire(tensor)
            dist.all_reduce(wire, op=getattr(dist.ReduceOp, op))
            if moved:
                tensor.copy_(wire)
            self.bytes_moved += 2 * tensor.numel() * tensor.element_size()
        return tensor

    def reduce_sum(self, tensor: torch.Tensor, owner: int) -> torch.Tensor:
        """Sum ``tensor`` over ranks into rank ``owner``'s copy (the others' copies are left undefined)."""
        if self.active:
            import torch.distributed as dist

            wire, moved = self._on_wire(tensor)
            dist.reduce(wire, dst=owner)
            if moved and self.rank == owner:
                tensor.copy_(wire)
            self.bytes_moved += tensor.numel() * tensor.element_size()
        return tensor

    def sum_gradients(self, parameters) -> None:
        """Sum of every gradient over ranks: each rank's loss is its rows' part of the whole step's mean (weighted
        per sample: ``training.train_block``, ``distill.train_end_to_end``), so the sum is the gradient one process
        would have. A rank without rows in the step (no gradient yet) adds zeros. The gradients travel flattened
        into one buffer per dtype, so a step is one all-reduce."""
        if not self.active:
            return
        parameters = [p for p in parameters if p.requires_grad or p.grad is not None]
        for p in parameters:
            if p.grad is None:  # every rank reduces the same buffers, whether or not its rows reached p
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in parameters]
        for dtype in dict.fromkeys(g.dtype for g in grads):
            same = [g for g in grads if g.dtype == dtype]
            flat = self.all_reduce_sum(torch.cat([g.reshape(-1) for g in same]))
            offset = 0
            for g in same:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def rows_of_everyone(self, count: int) -> tuple[int, int]:
        """(the rows of every rank together, the index among them of this rank's first) for this rank's share of
        ``count`` rows: ``shard`` cuts contiguous shares in rank order, so row ``i`` of this rank is row
        ``first + i`` of the single process."""
        if not self.active:
            return count, 0
        counts = torch.zeros(self.world_size, dtype=torch.int64)
        counts[self.rank] = count
        counts = self.all_reduce_sum(counts).tolist()
        return sum(counts), sum(counts[: self.rank])

    def broadcast_object(self, value, source: int, device: torch.device | None = None):
        """``value`` of rank ``source`` on every rank (any picklable object, tensors included: each rank
        receives them on ``device``, default the CPU)."""
        if not self.active:
            return value
        import torch.distributed as dist

        wire = self.communication_device
        if self.rank == source:
            buffer = io.BytesIO()
            torch.save(value, buffer)
            payload = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8).to(wire)
            size = torch.tensor([payload.numel()], dtype=torch.int64, device=wire)
        else:
            size = torch.zeros(1, dtype=torch.int64, device=wire)
        dist.broadcast(size, src=source)
        if self.rank != source:
            payload = torch.empty(int(size), dtype=torch.uint8, device=wire)
        dist.broadcast(payload, src=source)
        self.bytes_moved += int(size)
        if self.rank == source:
            return value
        return torch.load(io.BytesIO(payload.cpu().numpy().tobytes()), map_location=device or "cpu", weights_only=False)

    def gather(self, value) -> list:
        """Every rank's ``value``, in rank order, on every rank (small objects: per-rank numbers)."""
        return [self.broadcast_object(value, rank) for rank in range(self.world_size)]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    # --- owners ---------------------------------------------------------------------------------

    def solve_owned(
        self,
        statistics: dict[str, list[torch.Tensor]],
        costs: dict[str, float],
        solve: Callable[[str], object],
        report=None,
        where: str = "",
        device: torch.device | None = None,
        install: Callable[[str, object], None] | None = None,
    ) -> dict[str, object]:
        """Reduce each module's ``statistics`` (sums over this rank's tokens, summed in place) to its owner,
        let the owner ``solve(name)`` and hand every rank every result (on ``device``). ``install(name, result)``
        runs on every rank for every module: on the owner as soon as it solved it (one process installs each
        result before the next solve, as a loop would), on the others when the result arrives.

        Owners come from ``balance_owners(costs)``: every module has exactly one, the same on every rank. Report
        rows that a solve adds travel with its result, and every rank's report gets them in the order of
        ``statistics``, as a single process would have recorded them."""
        names = list(statistics)
        owners = balance_owners({name: costs[name] for name in names}, self.world_size)
        self.owners.update({f"{where}.{name}" if where else name: owners[name] for name in names})
        for name in names:
            for tensor in statistics[name]:
                self.reduce_sum(tensor, owners[name])
        solved, rows = {}, {}
        for name in names:
            if owners[name] == self.rank:
                start = len(report.rows) if report is not None else 0
                solved[name] = solve(name)
                if install is not None:
                    install(name, solved[name])
                if report is not None:
                    rows[name] = report.rows[start:]
                    del report.rows[start:]
        results = {}
        for name in names:
            value, added = self.broadcast_object((solved.get(name), rows.get(name, [])), owners[name], device)
            results[name] = value
            if install is not None and owners[name] != self.rank:
                install(name, value)
            if report is not None:
                if self.active:
                    for row in added:
                        row.setdefault("owner", owners[name])
                report.rows.extend(added)
        return results


class RowSample:
    """Rows ``0, every, 2 every, ..`` (at most ``size``) of every rank's rows together in rank order (``shard``'s
    order: the single process's), as one [size, C] tensor. Each rank fills the positions of its own rows
    (``first``: the index among all of its first row, from ``rows_of_everyone``) and leaves zeros elsewhere, so
    the sum over ranks (``all_reduce_sum``, or ``reduce_sum`` to an owner) is exactly the single process's sample:
    a sample of tokens that a search is run on (AWQ's clip search, BFP's greedy refinement) travels this way."""

    def __init__(self, first: int, every: int, size: int):
        self.next, self.every, self.size = first, every, size
        self.rows: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        """This rank's next rows [n, C], in order."""
        if self.rows is None:
            self.rows = torch.zeros(self.size, rows.shape[-1], device=rows.device)
        index = torch.arange(self.next, self.next + len(rows), device=rows.device)
        kept = (index % self.every == 0) & (index // self.every < self.size)
        self.rows[index[kept] // self.every] = rows[kept].float()
        self.next += len(rows)


def balance_owners(costs: dict[str, float], world_size: int) -> dict[str, int]:
    """An owner rank for every module: the costliest solve first, each onto the rank with the least work so
    far (ties: the lower rank). Deterministic, so every rank computes the same owners without talking."""
    load = [0.0] * world_size
    owners = {}
    for name in sorted(costs, key=lambda n: -costs[n]):  # sorted is stable: equal costs keep their order
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += costs[name]
    return {name: owners[name] for name in costs}


def refusal(step, world_size: int) -> str | None:
    """Why ``step`` cannot run on ``world_size`` processes, or None when it can."""
    if world_size == 1 or not step.needs_calibration or step.distributes is not None:
        return None
    return (
        f"does not run on several processes yet (--nproc {world_size}): its statistics are not split across ranks; "
        "run it with one process"
    )


def check_distributable(recipe, world_size: int) -> None:
    """Refuse, in one line naming the step, a recipe with a step that cannot run on ``world_size`` processes."""
    for index, step in enumerate(recipe.steps):
        why = refusal(step, world_size)
        if why is not None:
            raise DistributedError(f"{recipe.source}: steps[{index}].{step.name}: {why}")
    if recipe.needs_calibration and recipe.calibration.samples < world_size:
        raise DistributedError(
            f"{recipe.source}: calibration.samples: {recipe.calibration.samples} samples cannot be split over "
            f"{world_size} processes"
        )


# ----------------------------------------------------------------------------------------------
# Launching


def lost_contact(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank died, hung past the timeout or left."""
    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(word in text for word in ("gloo", "NCCL", "Timed out", "timed out"))


def end_with_parent() -> None:
    """A rank ends when the process that started it ends (Linux ``PR_SET_PDEATHSIG``): no process is left
    behind if the launcher is killed."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def under_launcher() -> bool:
    """Whether this process was started by torchrun (or ``launch``) as one rank of a run."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def launch(arguments: list[str], nproc: int, status_dir: Path, module: str = "compressor") -> int:
    """Run ``python -m MODULE ARGUMENTS`` (``compressor apply ...``) as ``nproc`` ranks on this machine under
    torch's launcher (the agent behind ``torchrun --standalone``, in this process). Returns 0 when every rank
    succeeded; when a rank fails, the agent ends the others and the exit status of the failure is returned,
    after one line naming the rank and what it was doing (``LaunchFailure``)."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # our own line says what failed
    status_dir.mkdir(parents=True, exist_ok=True)
    os.environ["COMPRESSOR_STATUS_DIR"] = str(status_dir)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    try:
        elastic_launch(config, sys.executable)("-m", module, *arguments)
    except ChildFailedError as error:
        # the rank that failed by itself, before one that lost contact with it, before one the agent then stopped
        def blame(item):
            exitcode = item[1].exitcode
            stopped = exitcode in (-signal.SIGTERM, 128 + signal.SIGTERM)
            return (2 if stopped else 1 if exitcode == LOST_CONTACT else 0, item[1].timestamp, item[0])

        failures = sorted(error.failures.items(), key=blame)
        rank, failure = failures[0]
        return LaunchFailure(rank, failure.exitcode, status_dir).exit_status()
    return 0


@dataclass
class LaunchFailure:
    rank: int
    exitcode: int
    status_dir: Path

    def doing(self, rank: int) -> str | None:
        status = self.status_dir / f"rank-{rank}"
        return status.read_text().strip() if status.is_file() else None

    def line(self) -> str:
        what = f" while {self.doing(self.rank)}" if self.doing(self.rank) else ""
        if self.exitcode == LOST_CONTACT:
            others = sorted(int(p.name.split("-")[1]) for p in self.status_dir.glob("rank-*"))
            where = "; ".join(f"rank {r}: {self.doing(r)}" for r in others if r != self.rank)
            return (
                f"error: rank {self.rank} lost contact with another rank{what} (one died, or hung past --timeout)"
                f"{'; where the others were: ' + where if where else ''}; the run was stopped"
            )
        if self.exitcode < 0:
            how = f"was killed by {signal.Signals(-self.exitcode).name}"
        else:
            how = f"exited with status {self.exitcode}"
        return f"error: rank {self.rank} {how}{what}; the other ranks were stopped"

    def exit_status(self) -> int:
        """A rank that failed with a user's error or our own one-line internal error has said why itself
        (statuses 1 and 2); for anything else (a signal, a crash) the launcher says which rank and what it did."""
        if self.exitcode not in (1, 2):
            print(self.line(), file=sys.stderr)
        return 128 - self.exitcode if self.exitcode < 0 else self.exitcode
