"""Shared helpers of the kernel tests: random value types and the tolerance check (see conftest.py)."""

import torch

from compressor.weights.values import LUTWeight, SparseOutliers, UniformWeight

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_error(y: torch.Tensor, expected: torch.Tensor) -> float:
    return ((y.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-30)).item()


def assert_matches(y: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = ""):
    assert y.shape == expected.shape, (y.shape, expected.shape)
    assert y.dtype == dtype, (y.dtype, dtype)
    error = rel_error(y, expected)
    assert error <= TOLERANCE[dtype], f"{what}: max error / max|y| = {error:.2e} > {TOLERANCE[dtype]:.0e}"


class Weights:
    """Random value types of every kind (seeded; codes cover the whole range of their width)."""

    def __init__(self, seed=0):
        self.generator = torch.Generator().manual_seed(seed)

    def codes(self, n, k, bits):
        return torch.randint(0, 2**bits, (n, k), generator=self.generator, dtype=torch.uint8)

    def uniform(self, n, k, bits, group_size=32, symmetric=True, scale_dtype=torch.float16, device=DEVICE):
        groups = 1 if group_size == -1 else -(-k // group_size)
        scales = (torch.rand(n, groups, generator=self.generator) * 0.1 + 0.01).to(scale_dtype)
        zeros = (
            None if symmetric else torch.randint(0, 2**bits, (n, groups), generator=self.generator, dtype=torch.int32)
        )
        weight = UniformWeight(
            codes=self.codes(n, k, bits), scales=scales, zeros=zeros, bits=bits, group_size=group_size
        )
        return to_device(weight, device)

    def lut(self, n, k, bits, lut_dtype=torch.float16, device=DEVICE):
        lut = torch.sort(torch.randn(n, 2**bits, generator=self.generator), dim=1).values.to(lut_dtype)
        return to_device(LUTWeight(codes=self.codes(n, k, bits), lut=lut, bits=bits), device)

    def outliers(self, n, k, density=0.05, value_dtype=torch.float16, device=DEVICE):
        mask = torch.rand(n, k, generator=self.generator) < density
        mask[n // 2] = False  # an empty row
        mask[1, : k // 2] = True  # a dense row: many entries of one row inside one block
        dense = torch.randn(n, k, generator=self.generator) * 3 * mask
        return to_device(SparseOutliers.from_dense(dense, value_dtype), device)

    def x(self, m, k, dtype, device=DEVICE):
        return torch.randn(m, k, generator=self.generator).to(device=device, dtype=dtype)

    def bias(self, n, dtype, device=DEVICE):
        return torch.randn(n, generator=self.generator).to(device=device, dtype=dtype)


def to_device(weight, device):
    from dataclasses import fields, replace

    moved = {
        f.name: getattr(weight, f.name).to(device)
        for f in fields(weight)
        if f.metadata.get("tensor") and getattr(weight, f.name) is not None
    }
    return replace(weight, **moved)
