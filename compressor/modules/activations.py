"""Activation quantization: the input side of a W+A quantized model, shared by every method that uses it.

Three pieces, applied wherever a quantized model runs (in memory during a session, in ``compressor
eval``, and after loading an export through our loader or transformers after ``import compressor``):

* ``ActivationSpec``: bits and symmetry of a per-token dynamic integer fake-quantizer;
  ``fake_quantize_tokens`` is its math (the last dim is the token's channels; ranges are taken from
  the tensor itself at every call, as W4A4 / W4A8 papers simulate it). Asymmetric:
  ``s = (max - min) / (2**b - 1)``, ``z = round(-min / s)``, ``x_hat = (clamp(round(x/s) + z, 0, 2**b-1) - z) * s``
  with ``s`` clamped to [1e-5, 1e4] (a constant token does not divide by zero, and since ``z`` is not
  clamped as in OmniQuant/QLLM's code, it comes back unchanged instead of shifted). Symmetric:
  ``s = max|x| / (2**(b-1) - 1)``. Rounding is straight-through, so the quantizer can sit in training.
* ``ChannelMap``: a fixed sparse linear map ``x'' = P x`` on a linear's input channels (CSR: row =
  new channel, col = original channel), applied before the activation quantizer. QLLM's channel
  reassembly is one (split outlier channels into scaled copies, average similar pairs).
* attention operands: ``install_attention_quantization(attention, spec)`` makes a transformers
  attention module fake-quantize its Q, K (after RoPE) and V per token and per head before the
  products; the softmax output stays unquantized. It swaps the module's attention function for
  ``QUANTIZED_ATTENTION``, which wraps the one the model was using (eager, sdpa...).

``QuantizedLinear.quantize_inputs(spec, channel_map)`` attaches the first two to a linear layer.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass

import torch

SCALE_MIN, SCALE_MAX = 1e-5, 1e4
QUANTIZED_ATTENTION = "compressor_quantized_qkv"  # the attention function name registered with transformers


@dataclass(frozen=True)
class ActivationSpec:
    """Per-token dynamic fake-quantization of activations: integers (``format: "int"``) or a float format
    of ``weights/values.py`` (``fp8``, ``nvfp4``, ``mxfp4``: symmetric, ``bits`` 8 or 4)."""

    bits: int
    symmetric: bool = False
    format: str = "int"
    # NVFP4: one calibrated global scale per layer (the module's ``input_global_scale``, compressed-tensors' form)
    # instead of one per token
    static_global_scale: bool = False

    def __post_init__(self):
        from compressor.weights.values import ACTIVATION_FORMATS, FLOAT_GRIDS

        if self.format == "int" and not 2 <= self.bits <= 8:
            raise ValueError(f"activation bits {self.bits} is not one of 2..8")
        if self.format != "int":
            if self.format not in ACTIVATION_FORMATS:
                choices = ", ".join(("int", *ACTIVATION_FORMATS))
                raise ValueError(f"activation format {self.format!r} is not one of {choices}")
            if (self.bits, self.symmetric) != (FLOAT_GRIDS[self.format].bits, True):
                raise ValueError(f"{self.format} activations are symmetric {FLOAT_GRIDS[self.format].bits}-bit")
        if self.static_global_scale and self.format != "nvfp4":
            raise ValueError(f"a static global scale is NVFP4's; {self.format} activations have none")

    def to_config(self) -> dict:
        """The compressed-tensors style description written into a checkpoint's config."""
        if self.format == "int":
            return {
                "num_bits": self.bits,
                "type": "int",
                "symmetric": self.symmetric,
                "strategy": "token",
                "dynamic": True,
            }
        return float_activation_config(self.format, self.static_global_scale)

    @classmethod
    def from_config(cls, entry: dict | None) -> ActivationSpec | None:
        if entry is None:
            return None
        if entry.get("type", "int") == "float":
            known = [
                (f, static) for f in ("fp8", "nvfp4", "mxfp4") for static in (False, True) if f == "nvfp4" or not static
            ]
            match = next(
                ((f, static) for f, static in known if _same_float_config(float_activation_config(f, static), entry)),
                None,
            )
            if match is None:
                raise ValueError(f"float activations {entry} are none of fp8, nvfp4, mxfp4 (dynamic)")
            return cls(int(entry["num_bits"]), True, match[0], match[1])
        if entry.get("strategy", "token") != "token" or not entry.get("dynamic", True):
            raise ValueError(f"only dynamic per-token activation quantization is supported, not {entry}")
        return cls(int(entry["num_bits"]), bool(entry.get("symmetric", False)))


def _same_float_config(ours: dict, entry: dict) -> bool:
    """A config's ``input_activations`` is ours, whatever keys compressed-tensors adds when it writes one back
    (``observer``, ``zp_dtype``...): every key we write has our value."""
    return all(entry.get(key) == value for key, value in ours.items())


def float_activation_config(format: str, static_global_scale: bool = False) -> dict:
    """compressed-tensors' ``input_activations`` of a dynamic float format (FP8_DYNAMIC's, MXFP4's; NVFP4's with
    a global scale per token (ours: ``dynamic: true``), or compressed-tensors' NVFP4 preset: a calibrated static
    ``input_global_scale`` per layer and dynamic local block scales, ``dynamic: "local"``)."""
    if format == "fp8":
        return {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "group_size": None,
            "strategy": "token",
            "dynamic": True,
        }
    strategy, group_size, scale_dtype = {
        "nvfp4": ("tensor_group", 16, "torch.float8_e4m3fn"),
        "mxfp4": ("group", 32, "torch.uint8"),
    }[format]
    return {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": group_size,
        "strategy": strategy,
        "dynamic": "local" if static_global_scale else True,
        "scale_dtype": scale_dtype,
    }


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (x.round() - x).detach()


def fake_quantize_tokens(x: torch.Tensor, bits: int, symmetric: bool = False) -> torch.Tensor:
    """Per-token (last dim) dynamic min-max fake quantization, straight-through rounding, computed in fp32."""
    original = x.dtype
    x = x.float()
    qmax = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1) - 1
        scale = (x.abs().amax(dim=-1, keepdim=True) / half).clamp(SCALE_MIN, SCALE_MAX)
        codes = _round_ste(x / scale).clamp(-half - 1, half)
        return (codes * scale).to(original)
    low, high = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    scale = ((high - low) / qmax).clamp(SCALE_MIN, SCALE_MAX)
    zero = _round_ste(-low / scale)  # unclamped (official: +-1e4), so a constant token comes back as itself
    codes = (_round_ste(x / scale) + zero).clamp(0, qmax)
    return ((codes - zero) * scale).to(original)


def quantize_activations(
    x: torch.Tensor, spec: ActivationSpec | None, global_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``x`` through ``spec`` (None: unchanged); ``global_scale``: a static NVFP4 layer's ``input_global_scale``."""
    if spec is None:
        return x
    if spec.format != "int":
        from compressor.weights.values import fake_quantize_float_tokens

        return fake_quantize_float_tokens(x, spec.format, global_scale)
    return fake_quantize_tokens(x, spec.bits, spec.symmetric)


# ----------------------------------------------------------------------------------------------
# A fixed sparse map on a linear's input channels


@dataclass
class ChannelMap:
    """``x'' = P x`` on the last dim, P a [channels, in_channels] CSR matrix (row = output channel)."""

    crow: torch.Tensor  # int32 [channels + 1]
    col: torch.Tensor  # int32 [nnz], input channel of each entry
    val: torch.Tensor  # float32 [nnz]
    in_channels: int

    @property
    def channels(self) -> int:
        return self.crow.numel() - 1

    @property
    def nnz(self) -> int:
        return self.col.numel()

    @classmethod
    def from_entries(
        cls, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, channels: int, in_channels: int
    ) -> ChannelMap:
        """CSR from (row, col, value) triples in any order (a (row, col) pair must appear once)."""
        order = torch.argsort(rows * in_channels + cols)
        rows, cols, values = rows[order], cols[order], values[order]
        counts = torch.bincount(rows, minlength=channels)
        crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return cls(crow.to(torch.int32), cols.to(torch.int32), values.float(), in_channels)

    def row_index(self) -> torch.Tensor:
        return torch.repeat_interleave(
            torch.arange(self.channels, device=self.crow.device), (self.crow[1:] - self.crow[:-1]).long()
        )

    def dense(self) -> torch.Tensor:
        matrix = torch.zeros(self.channels, self.in_channels, dtype=torch.float32, device=self.val.device)
        matrix[self.row_index(), self.col.long()] = self.val.float()
        return matrix

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return apply_channel_map(x, self.crow, self.col, self.val)


def apply_channel_map(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """``P x`` for P in CSR over the last dim of ``x`` (a gather, a scale and a segment sum, in fp32)."""
    channels = crow.numel() - 1
    rows = torch.repeat_interleave(torch.arange(channels, device=x.device), (crow[1:] - crow[:-1]).long().to(x.device))
    gathered = x.float().index_select(-1, col.long().to(x.device)) * val.float().to(x.device)
    out = torch.zeros(*x.shape[:-1], channels, dtype=torch.float32, device=x.device)
    return out.index_add(-1, rows, gathered).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Attention operands


def quantized_attention(module, query, key, value, attention_mask, **kwargs):
    """The attention function of a module with ``activation_quantization``: Q, K, V fake-quantized
    per token (per head, over head_dim), then the function the model used before."""
    spec = module.activation_quantization
    query, key, value = (quantize_activations(t, spec) for t in (query, key, value))
    return base_attention_function(module)(module, query, key, value, attention_mask, **kwargs)


def base_attention_function(module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = module.base_attention
    if name in (None, "eager"):
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def register_quantized_attention() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if QUANTIZED_ATTENTION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(QUANTIZED_ATTENTION, quantized_attention)


def install_attention_quantization(attention, spec: ActivationSpec | None) -> None:
    """Make ``attention`` (a transformers attention module) quantize Q, K and V per token at ``spec``
    (None: undo). The module gets its own copy of the config naming our attention function, so other
    modules sharing the config are unaffected."""
    current = getattr(attention, "base_attention", False)
    if spec is None:
        if current is not False:
            attention.config = attention.original_config
            del attention.activation_quantization, attention.base_attention, attention.original_config
        return
    register_quantized_attention()
    attention.activation_quantization = spec
    if current is False:
        attention.original_config = attention.config
        attention.base_attention = attention.config._attn_implementation
        config = copy.copy(attention.config)
        config._attn_implementation_internal = QUANTIZED_ATTENTION
        attention.config = config
