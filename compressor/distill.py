"""Distillation towards the original model: its top-k next-token log-probabilities and the KL to them.

Steps that train a compressed model towards the uncompressed one (``transmla_heal``, EfficientQAT's
E2E-QP with ``objective: distill``) read the original again from its checkpoint, run it block by
block over the calibration tokens once, and keep ``k`` log-probabilities and token ids per position
on the CPU instead of the vocabulary; ``coarse_kl`` is then the exact KL of that coarsened
distribution (the top-k tokens plus one bucket for the rest of the vocabulary).
"""

from __future__ import annotations

import torch


def coarse_kl(student_logits: torch.Tensor, teacher_top_logp: torch.Tensor, teacher_top_index: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) over the teacher's top-k tokens plus one bucket holding
    the rest of the vocabulary: exact for that coarsened distribution, and k numbers per token."""
    logp = torch.log_softmax(student_logits.float(), -1)
    student_top = logp.gather(-1, teacher_top_index)
    teacher_p = teacher_top_logp.exp()
    teacher_rest = (1 - teacher_p.sum(-1)).clamp_min(1e-12)
    student_rest = (1 - student_top.exp().sum(-1)).clamp_min(1e-12)
    kl = (teacher_p * (teacher_top_logp - student_top)).sum(-1) + teacher_rest * (teacher_rest.log() - student_rest.log())
    return kl.mean()


@torch.no_grad()
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
