"""Hadamard transforms: the orthogonal rotations of a rotated model (``compressor/quant/rotate.py``),
and the one a rotated model runs online, before each MLP's ``down_proj``.

An orthogonal ``n x n`` transform is built as ``kron(M, S_p)``: ``S_p`` the Sylvester (Walsh-)Hadamard
matrix of the largest power of two ``p`` that leaves a factor ``m = n / p`` with a known Hadamard
matrix (1, or ``q + 1`` for a prime ``q = 3 mod 4``: Paley's first construction; 12 for 768 = 12 x 64),
both normalised. When no such ``m`` exists (11008 = 43 x 256), ``M`` is the identity of the odd part:
a block-diagonal Hadamard, still exact and orthogonal, that mixes channels within blocks of ``p``.
``M`` is kept as small integers (+-1, or 0/1), so it survives any float dtype a checkpoint uses.

``hadamard_transform(x, factor)`` applies ``x -> x kron(M, S_p)`` over the last dim with a fast
Walsh-Hadamard transform (``p log p``) and one small ``m x m`` product, in fp32.

``OnlineHadamardMLP`` is a Llama-family gated MLP whose ``down_proj`` reads its input in that basis:
``down_proj(T(act(gate(x)) * up(x)))``; the rotate step folds ``T^T`` into ``down_proj`` so the output
is unchanged. It keeps the MLP's children (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``) at their
paths, so quantizers that capture a linear's inputs see the rotated ones, and holds ``M`` as the buffer
``online_hadamard``, which the native export writes and our loaders restore.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def paley(q: int) -> torch.Tensor:
    """A Hadamard matrix of order ``q + 1`` (entries +-1) for a prime ``q = 3 mod 4`` (Paley I)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)])
    index = torch.arange(q)
    jacobsthal = chi[(index[None, :] - index[:, None]) % q]  # skew-symmetric for q = 3 mod 4
    n = q + 1
    skew = torch.zeros(n, n, dtype=torch.long)
    skew[0, 1:] = 1
    skew[1:, 0] = -1
    skew[1:, 1:] = jacobsthal
    return (torch.eye(n, dtype=torch.long) + skew).to(torch.int8)


def sylvester(p: int) -> torch.Tensor:
    """The Sylvester-Hadamard matrix of order ``p`` (a power of two), entries +-1, symmetric."""
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < p:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


LARGEST_FACTOR = 256  # a larger Paley factor costs more online than the block-diagonal fallback saves


def hadamard_factor(n: int) -> torch.Tensor:
    """``M`` (int8, m x m) of ``kron(M, S_p)`` for size ``n``: a Paley Hadamard matrix of order at most
    ``LARGEST_FACTOR``, [[1]], or the identity of ``n``'s odd part when no such order fits."""
    p = n & -n  # the largest power of two dividing n
    while p >= 1 and n // p <= LARGEST_FACTOR:
        m = n // p
        if m == 1:
            return torch.ones(1, 1, dtype=torch.int8)
        if m % 4 == 0 and is_prime(m - 1) and (m - 1) % 4 == 3:
            return paley(m - 1)
        p //= 2
    return torch.eye(n // (n & -n), dtype=torch.int8)


def normalized(factor: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``M`` scaled to an orthogonal matrix (its columns all have the same norm)."""
    factor = factor.to(dtype)
    return factor / factor[:, 0].norm()


def fwht(x: torch.Tensor) -> torch.Tensor:
    """``x S_p`` over the last dim (unnormalised fast Walsh-Hadamard transform; p a power of two)."""
    *lead, n = x.shape
    h = 1
    while h < n:
        pairs = x.reshape(*lead, n // (2 * h), 2, h)
        x = torch.stack((pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]), dim=-2)
        x = x.reshape(*lead, n)
        h *= 2
    return x


def hadamard_transform(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x kron(M, S_p) / norms`` over the last dim, computed in fp32 (fp64 for fp64), in ``x``'s dtype."""
    n, m = x.shape[-1], factor.shape[0]
    p = n // m
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    blocks = fwht(x.to(dtype).reshape(*x.shape[:-1], m, p)) / math.sqrt(p)
    mixed = torch.einsum("...ij,ik->...kj", blocks, normalized(factor, dtype).to(x.device))
    return mixed.reshape(x.shape).to(x.dtype)


def dense_hadamard(n: int, factor: torch.Tensor | None = None) -> torch.Tensor:
    """The orthogonal matrix ``T = kron(M, S_p)`` (normalised) that ``hadamard_transform`` applies, fp64."""
    factor = hadamard_factor(n) if factor is None else factor
    p = n // factor.shape[0]
    return torch.kron(normalized(factor, torch.float64), sylvester(p).double() / math.sqrt(p))


class OnlineHadamardMLP(nn.Module):
    """A gated MLP whose ``down_proj`` reads ``T(act(gate(x)) * up(x))``, T = ``hadamard_transform`` by
    the buffer ``online_hadamard`` (``M``)."""

    def __init__(self, mlp: nn.Module, factor: torch.Tensor):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.register_buffer("online_hadamard", factor.to(torch.int8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(hadamard_transform(hidden, self.online_hadamard))


def install_online_hadamard(model: nn.Module, sizes: dict[str, int]) -> None:
    """Swap each named MLP (module name -> factor size ``m``) of ``model`` for an ``OnlineHadamardMLP``
    whose factor is to be loaded (what a checkpoint's ``online_hadamard`` entry lists)."""
    for name, m in sizes.items():
        mlp = model.get_submodule(name)
        if not isinstance(mlp, OnlineHadamardMLP):
            model.set_submodule(name, OnlineHadamardMLP(mlp, torch.zeros(int(m), int(m), dtype=torch.int8)))
