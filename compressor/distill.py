"""Training a compressed model end to end towards the original: the teacher, the loss, the trainer.

Steps that train a compressed model towards the uncompressed one (``transmla_heal``, E2E-QP with
``objective: distill``) read the original again from its checkpoint, run it block by block over the
calibration tokens once per run (``ModelContext.teacher``), and keep ``k`` log-probabilities and
token ids per position on the CPU instead of the vocabulary; ``coarse_kl`` is then the exact KL of
that coarsened distribution (the top-k tokens plus one bucket for the rest of the vocabulary).
``train_end_to_end`` is the one training loop they share: AdamW over the calibration tokens through
``context.forward_backward`` (block by block, offloaded when the model does not fit), with progress
and a held-out split whose best state is kept (``compressor.training``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch

from compressor.blockwise import next_token_loss
from compressor.training import BestState, holdout_count


def coarse_kl(
    student_logits: torch.Tensor, teacher_top_logp: torch.Tensor, teacher_top_index: torch.Tensor
) -> torch.Tensor:
    """Mean per-token KL(teacher || student) over the teacher's top-k tokens plus one bucket holding
    the rest of the vocabulary: exact for that coarsened distribution, and k numbers per token."""
    logp = torch.log_softmax(student_logits.float(), -1)
    student_top = logp.gather(-1, teacher_top_index)
    teacher_p = teacher_top_logp.exp()
    teacher_rest = (1 - teacher_p.sum(-1)).clamp_min(1e-12)
    student_rest = (1 - student_top.exp().sum(-1)).clamp_min(1e-12)
    kl = (teacher_p * (teacher_top_logp - student_top)).sum(-1) + teacher_rest * (
        teacher_rest.log() - student_rest.log()
    )
    return kl.mean()


@torch.no_grad()
def check_top_k(top_k: int, config) -> None:
    """Refuse, before any work, a ``top_k`` larger than the vocabulary the teacher's distribution covers."""
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and top_k > vocab:
        raise ValueError(f"top_k: {top_k} is more than the model's vocabulary of {vocab} tokens")


def teacher_top_k(path, tokens: torch.Tensor, device, dtype, offloaded: bool, k: int, batch_size: int, progress=None):
    """Top-k next-token log-probabilities of the model at ``path`` (read again from its checkpoint,
    run block by block), on the CPU: ``k`` values and indices per token instead of the vocabulary.
    ``progress`` (a ``Progress``) counts the sequences."""
    from compressor.blockwise import BlockwiseModel
    from compressor.model import ModelHandle

    teacher = ModelHandle.open(path)
    teacher.materialize_all(device, dtype, block_device="cpu" if offloaded else None)
    runner = BlockwiseModel(teacher, device, offloaded)
    values, indices = [], []
    for batch in tokens.split(batch_size):
        top = torch.log_softmax(runner.logits(batch), -1).topk(k, dim=-1)
        values.append(top.values.cpu())
        indices.append(top.indices.cpu())
        if progress is not None:
            progress.update(len(batch))
    teacher.release(teacher.model)
    return torch.cat(values), torch.cat(indices)


def optimizer_step(context, optimizer, tokens, rows, size: int, micro_batch_size: int, loss_of, max_grad_norm) -> float:
    """One step on the sequences ``rows`` of ``tokens`` (this rank's part of a step of ``size`` sequences):
    gradients accumulated over micro-batches, each weighted by its share of the step, summed over ranks,
    clipped, applied. Returns the step's loss (the mean over its sequences); a non-finite loss is the caller's
    to refuse."""
    optimizer.zero_grad(set_to_none=True)
    loss = 0.0
    for micro in rows.split(micro_batch_size) if len(rows) else ():  # (a rank may hold none of a step's rows)
        loss += context.forward_backward(tokens[micro].to(context.device), loss_of(micro, len(micro) / size))
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    distributed = context.run.distributed
    if distributed.active:  # several processes: each rank's part of the step's mean, summed (distributed.py)
        distributed.sum_gradients(parameters)
        loss = float(distributed.all_reduce_sum(torch.tensor([loss], dtype=torch.float64)))
    if not math.isfinite(loss):
        return loss
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    return loss


def train_end_to_end(
    context,
    groups: list[dict],
    *,
    name: str,
    epochs: int,
    batch_size: int,
    micro_batch_size: int,
    order: Callable[[int, int], torch.Tensor],
    objective: str = "distill",
    top_k: int = 64,
    lr_at: Callable[[float, int, int], float] | None = None,
    max_grad_norm: float | None = None,
    heldout: float = 0.0,
) -> tuple[list[float], BestState | None]:
    """Train the parameters of ``groups`` (AdamW param groups, weight decay 0) on the calibration tokens.

    The last ``heldout`` fraction of the sequences is not trained on: the loss on it, before training
    and after each epoch, decides which state is kept (``training.BestState``). Each epoch visits the
    others in ``order(epoch, count)`` (a permutation of ``range(count)``), one optimizer step per
    ``batch_size`` sequences whose gradients accumulate over micro-batches of ``micro_batch_size``
    (the step's loss is their mean). The loss is the KL to the original model's top-``top_k``
    next-token distribution (``objective: distill``, ``context.teacher``) or the next-token
    cross-entropy (``next_token``). ``lr_at(base, step, total)`` sets each group's rate before a step
    (default: constant); ``max_grad_norm`` clips all gradients together. Returns every step's loss
    and the held-out record (None without a held-out part). The caller sets ``requires_grad`` and
    restores what it changed; gradients are dropped here.

    On several processes (compressor/distributed.py) each rank holds a contiguous share of the sequences; the
    held-out part, the order and the steps are those of the single process over all of them, and each rank
    runs the sequences of each step that it holds, its loss weighted by their share of the step, so the
    gradients summed over ranks are the single process's (up to the order of float sums)."""
    tokens = context.calibration_tokens()
    distributed = context.run.distributed
    count, first = distributed.rows_of_everyone(len(tokens))

    def mine(rows: torch.Tensor) -> torch.Tensor:
        """The rows (of all the sequences) this rank holds, as indices into its share."""
        return rows[(rows >= first) & (rows < first + len(tokens))] - first

    if objective == "distill":
        teacher_logp, teacher_index = context.teacher(top_k, micro_batch_size)

    def loss_of(rows: torch.Tensor, weight: float):
        if objective == "distill":
            top_logp, top_index = teacher_logp[rows].to(context.device), teacher_index[rows].to(context.device)
            return lambda logits, ids: coarse_kl(logits, top_logp, top_index) * weight
        return lambda logits, ids: next_token_loss(logits, ids) * weight

    train_count = count - holdout_count(count, heldout)
    held_count = count - train_count
    heldout_rows = mine(torch.arange(train_count, count))

    def heldout_loss() -> float:
        loss = sum(
            float(
                loss_of(rows, len(rows) / held_count)(
                    context.logits(tokens[rows].to(context.device)), tokens[rows].to(context.device)
                )
            )
            for rows in (heldout_rows.split(micro_batch_size) if len(heldout_rows) else ())
        )
        return float(distributed.all_reduce_sum(torch.tensor([loss], dtype=torch.float64)))

    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    bases = [group["lr"] for group in optimizer.param_groups]
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    best = BestState(parameters, heldout_loss()) if held_count else None
    per_epoch = math.ceil(train_count / batch_size)
    total = epochs * per_epoch
    losses = resume_training(context, optimizer, parameters, best, total)

    def state() -> dict:
        """What --resume needs to continue after the last step taken (``compressor/resume.py``)."""
        return {
            "losses": list(losses),
            "parameters": [p.detach().to("cpu", copy=True) for p in parameters],
            "optimizer": optimizer.state_dict(),
            "best": None if best is None else (best.curve, best.best_loss, best.best_epoch, best.saved),
        }

    commits = context.run.commits
    try:
        with context.progress(total, "training", "step") as progress:
            for epoch in range(epochs):
                moved = False
                for number, batch in enumerate(order(epoch, train_count).split(batch_size)):
                    if epoch * per_epoch + number < len(losses):
                        continue  # taken before the run was interrupted (its order is drawn all the same)
                    if lr_at is not None:
                        for group, base in zip(optimizer.param_groups, bases):
                            group["lr"] = lr_at(base, len(losses), total)
                    loss = optimizer_step(
                        context, optimizer, tokens, mine(batch), len(batch), micro_batch_size, loss_of, max_grad_norm
                    )
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"{name}: the training loss became {loss}")
                    losses.append(loss)
                    progress.update(loss=loss)
                    moved = True
                    if commits is not None:
                        commits.commit_progress(context.step, state)
                if best is not None and len(best.curve) <= epoch + 1:
                    best.consider(heldout_loss())
                    progress.update(0, heldout=best.curve[-1])
                    moved = True
                if commits is not None and moved:
                    commits.commit_progress(context.step, state, force=True)
        if best is not None:
            best.restore()
    finally:
        optimizer.zero_grad(set_to_none=True)
    return losses, best


def resume_training(context, optimizer, parameters: list[torch.Tensor], best: BestState | None, total: int) -> list:
    """A resumed run (``--resume``): the trained tensors, optimizer state and held-out record the interrupted
    run committed last, put back, and its losses so far returned (empty: train from the start); one line says
    where training continues."""
    commits = context.run.commits
    saved = commits.committed_progress(context.step, "cpu") if commits is not None else None
    if commits is not None and commits.resuming and context.run.distributed.writes:
        where = f"continuing after step {len(saved['losses'])} of {total}" if saved else "no step was committed"
        print(f"resume: {context.step.name}: training {where} (the steps before it ran again)", file=sys.stderr)
    if saved is None:
        return []
    with torch.no_grad():
        for parameter, value in zip(parameters, saved["parameters"], strict=True):
            parameter.copy_(value)
    optimizer.load_state_dict(saved["optimizer"])
    if best is not None:
        best.curve, best.best_loss, best.best_epoch, best.saved = saved["best"]
    return saved["losses"]
