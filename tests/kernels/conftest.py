"""Kernel tests: Triton kernels against their torch references, on the CPU through the interpreter.

TRITON_INTERPRET must be set before triton is first imported (it fixes how every ``@triton.jit``
function, Triton's own included, is built), so it is set here, before anything else is imported,
when there is no CUDA device. Shapes are tiny and awkward (N odd, K a multiple of neither the
block nor the group, M = 1, 3, 17): the interpreter runs one program at a time in Python.

Tolerances (max |y - y_ref| / max |y_ref|, against the fp32 ground truth): fp32 activations 1e-5,
fp16 2e-3, bf16 1e-2. fp16/bf16 outputs are rounded once (and the tl.dot operands are the
dequantized weights rounded to x's dtype); the largest errors measured over the suite are 6e-4 for
fp16, 6e-3 for bf16 and 5e-7 for fp32, where one wrong code already shows as > 1e-3.
Packing, repacking and dequantized weights are compared exactly.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from kernel_helpers import Weights  # noqa: E402


@pytest.fixture
def weights():
    return Weights()
