"""What every training phase shares: a held-out part of the calibration data, and the rule that a
phase never returns a model worse on it than the one it started from.

A phase measures its loss on the held-out sequences before training and after each epoch, keeps a
copy of its trained tensors at the best point (``BestState``), and puts that copy back at the end. The
held-out losses form the curve the report records beside the training losses.
"""

from __future__ import annotations

import math

import torch


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
