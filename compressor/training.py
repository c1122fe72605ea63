"""What every training phase shares: a held-out part of the calibration data, and the rule that a
phase never returns a model worse on it than the one it started from.

Block-wise reconstruction training (EfficientQAT's Block-AP, QLLM's error correction) shares the loop
at the end: ``micro_batches`` of (quantized-stream input, fp target, block kwargs), ``block_mse``, and
``train_block`` (AdamW on the block's MSE, per-group learning-rate schedules, held-out best state).

A phase measures its loss on the held-out sequences before training and after each epoch, keeps a
copy of its trained tensors at the best point (``BestState``), and puts that copy back at the end. The
held-out losses form the curve the report records beside the training losses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from compressor.blockwise import first_output


def holdout_count(total: int, fraction: float) -> int:
    """Sequences held out of ``total``: ``fraction`` of them, at least one when ``fraction > 0``,
    and never all (at least one is left to train on)."""
    if fraction <= 0 or total < 2:
        return 0
    return min(max(1, round(total * fraction)), total - 1)


class BestState:
    """Copies (in CPU memory) of ``tensors`` at the lowest held-out loss seen so far."""

    def __init__(self, tensors: list[torch.Tensor], loss: float):
        self.tensors = tensors
        self.curve = [loss]  # held-out loss before training, then after each epoch
        self.best_loss, self.best_epoch = loss, 0
        self.saved = self._copy()

    def _copy(self) -> list[torch.Tensor]:
        return [t.detach().to("cpu", copy=True) for t in self.tensors]

    def consider(self, loss: float) -> None:
        """The held-out loss after one more epoch: keep a copy if it is the best so far."""
        self.curve.append(loss)
        if loss < self.best_loss:
            self.best_loss, self.best_epoch = loss, len(self.curve) - 1
            self.saved = self._copy()

    @torch.no_grad()
    def restore(self) -> bool:
        """Put the best tensors back; True when that undid the training after them."""
        if self.best_epoch == len(self.curve) - 1:
            return False
        for tensor, saved in zip(self.tensors, self.saved):
            tensor.copy_(saved)
        return True

    def summary(self) -> dict:
        """The report's view: the held-out curve, which epoch was kept (0: the untrained start)."""
        return {"heldout_curve": [round(v, 6) for v in self.curve], "kept_epoch": self.best_epoch}


def warmup_cosine_lr(base: float, step: int, total: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine to 0 at ``total`` (transformers' schedule,
    counted so that the first step already has a nonzero rate)."""
    if step < warmup:
        return base * (step + 1) / (warmup + 1)
    return base * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1))) / 2


def warmup_cosine_schedule(warmup_ratio: float):
    """``lr_at`` for ``distill.train_end_to_end``: linear warmup over ``warmup_ratio`` of the ``total`` optimizer
    steps the trainer takes, then cosine to 0."""
    return lambda base, step, total: warmup_cosine_lr(base, step, total, math.ceil(warmup_ratio * total))


# ----------------------------------------------------------------------------------------------
# Block-wise reconstruction training


def cosine_lr(base: float, floor: float, step: int, total: int) -> float:
    """Cosine annealing from ``base`` (step 0) towards ``floor`` (step ``total``)."""
    return floor + (base - floor) * (1 + math.cos(math.pi * step / max(total, 1))) / 2


def cast_floating(value, dtype: torch.dtype):
    """``value`` (a tensor, or tuples/lists/dicts of them) with floating tensors cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(cast_floating(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: cast_floating(v, dtype) for k, v in value.items()}
    return value


def slice_batch(value, rows: slice, batch: int):
    """Rows ``rows`` of every tensor in ``value`` whose first dim is the batch (masks); others as is."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() and value.shape[0] == batch and batch > 1 else value
    if isinstance(value, (tuple, list)):
        return type(value)(slice_batch(v, rows, batch) for v in value)
    if isinstance(value, dict):
        return {k: slice_batch(v, rows, batch) for k, v in value.items()}
    return value


def micro_batches(
    inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: list[dict], size: int
) -> list[tuple]:
    """(input, target, kwargs) of ``size`` samples each, cut from the session's batches, in order."""
    batches = []
    for x, y, kw in zip(inputs, targets, kwargs):
        for start in range(0, len(x), size):
            rows = slice(start, start + size)
            batches.append((x[rows], y[rows], slice_batch(kw, rows, len(x))))
    return batches


def block_dtype(block: nn.Module) -> torch.dtype:
    """The dtype a block computes in: its first floating tensor's (a block may hold no parameter once its
    linears are quantized and its norms carry no weight, as OLMo's)."""
    tensors = [*block.parameters(), *block.buffers()]
    return next(t.dtype for t in tensors if t.is_floating_point())


def block_mse(block: nn.Module, batches: list[tuple], distributed=None) -> float:
    """Mean reconstruction MSE of ``block`` over ``batches`` (sample-weighted); with ``distributed`` (a
    ``compressor.distributed.Distributed``) over every rank's batches."""
    total = count = 0.0
    with torch.no_grad():
        for x, y, kw in batches:
            dtype = block_dtype(block)
            out = first_output(block(x.to(dtype), **cast_floating(kw, dtype)))
            total += float(F.mse_loss(out.float(), y.float())) * len(x)
            count += len(x)
    if distributed is not None and distributed.active:
        total, count = distributed.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
    return total / max(count, 1)


def shared_steps(batches: list[tuple], batch_size: int, distributed=None) -> list[tuple[list[tuple], int]]:
    """The optimizer steps of ``train_block``: alone, one per micro-batch (``micro_batches`` of ``batch_size``);
    on several processes (``distributed``), the single process's steps over every rank's samples (consecutive
    groups of ``batch_size`` in rank order, as one process cuts a calibration batch that holds a multiple of
    ``batch_size`` samples). Each step is (the pieces of it this rank holds: (input, target, kwargs), possibly
    none; the step's number of samples)."""
    if distributed is None or not distributed.active:
        return [([batch], len(batch[0])) for batch in batches]
    total, row = distributed.rows_of_everyone(sum(len(x) for x, _, _ in batches))
    steps = [([], min(batch_size, total - start)) for start in range(0, total, batch_size)]
    for x, y, kw in batches:
        start = 0
        while start < len(x):  # a micro-batch of this rank may straddle two of the single process's steps
            step = (row + start) // batch_size
            end = min(len(x), (step + 1) * batch_size - row)
            rows = slice(start, end)
            steps[step][0].append((x[rows], y[rows], slice_batch(kw, rows, len(x))))
            start = end
        row += len(x)
    return steps


def train_block(
    block: nn.Module,
    batches: list[tuple],
    groups: list[dict],
    epochs: int,
    min_lr_factor: float,
    heldout: float = 0.0,
    progress=None,
    schedule=None,
    where: str = "efficientqat_block_ap",
    distributed=None,
    batch_size: int | None = None,
) -> tuple[list[float], BestState | None]:
    """AdamW on the reconstruction MSE, per-group cosine schedules stepped per batch (``schedule(base,
    step, total)`` replaces the cosine towards ``base / min_lr_factor``; ``where`` names the step in errors). The last
    ``heldout`` fraction of ``batches`` is not trained on: its MSE before training and after each epoch
    decides which state the block keeps. Returns the mean training loss per epoch and that record.

    With ``distributed`` (several processes, each with its own share of the samples, ``batches`` its
    ``micro_batches`` of ``batch_size``) every rank takes the single process's steps (``shared_steps``): it runs
    the samples of each step it holds, each piece's MSE weighted by its share of the step, and the gradients are
    summed over ranks; the held-out MSE is taken over every rank's held-out samples, so all ranks keep the same
    state."""
    steps = shared_steps(batches, batch_size or max(len(x) for x, _, _ in batches), distributed)
    held = holdout_count(len(steps), heldout)
    steps, heldout_batches = (
        steps[: len(steps) - held],
        [piece for pieces, _ in steps[len(steps) - held :] for piece in pieces],
    )
    trained = [p for group in groups for p in group["params"]]
    best = BestState(trained, block_mse(block, heldout_batches, distributed)) if held else None
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    bases = [group["lr"] for group in optimizer.param_groups]
    total, step, epoch_losses = epochs * len(steps), 0, []
    with torch.enable_grad():
        for _ in range(epochs):
            losses = []
            for pieces, size in steps:
                for group, base in zip(optimizer.param_groups, bases):
                    group["lr"] = (
                        schedule(base, step, total) if schedule else cosine_lr(base, base / min_lr_factor, step, total)
                    )
                optimizer.zero_grad(set_to_none=True)
                loss = 0.0
                for x, y, kw in pieces:
                    out = first_output(block(x.float(), **cast_floating(kw, torch.float32)))
                    mse = F.mse_loss(out, y.float())
                    if not torch.isfinite(mse):
                        raise FloatingPointError(f"{where}: the reconstruction loss became {float(mse)}")
                    (mse * (len(x) / size)).backward()
                    loss += mse.item() * (len(x) / size)
                if distributed is not None and distributed.active:
                    distributed.sum_gradients(trained)
                    loss = float(distributed.all_reduce_sum(torch.tensor([loss], dtype=torch.float64)))
                optimizer.step()
                losses.append(loss)
                step += 1
                if progress is not None:
                    progress.update(loss=losses[-1])
            epoch_losses.append(sum(losses) / len(losses))
            if best is not None:
                best.consider(block_mse(block, heldout_batches, distributed))
    if best is not None:
        best.restore()
    block.requires_grad_(False)
    return epoch_losses, best
