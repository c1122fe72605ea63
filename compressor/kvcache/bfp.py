"""A transformers ``Cache`` that stores keys (and optionally values) in block floating point.

Each token's key vector of one layer (``H_kv * head_dim`` channels, post-RoPE, as the attention
hands it to ``cache.update``) is gathered by the layer's channel permutation ``perm`` (K-sort,
``compressor/quant/bfp.py``), cut into blocks of ``block_size`` channels that share one 8-bit
exponent (``weights.values.bfp_encode``), and stored as mantissas (two per byte at 4 bits) plus
exponent bytes. ``update`` returns the whole cache dequantized and put back in the original
channel order, so the attention code runs unmodified with the original queries; the scores are
those of permuted queries against permuted keys (a permutation of both sides of a dot product
changes nothing), which is what a fused kernel computes instead.

``scope``: ``"token"`` cuts the blocks over the token's whole key vector (all KV heads of the
layer), ``"head"`` within each head (needs ``head_dim % block_size == 0``). Each token is encoded on
its own, so appending never re-quantizes and there is no full-precision window.

``quantize_fresh`` (default True): the tokens of the current forward attend to their own quantized
keys too, so a prefill (and ``compressor eval``) measures the quantized cache on the prompt as well;
False hands the fresh tokens back exact and only what was cached earlier is quantized.

``install(model, spec)`` makes every forward (and ``generate``) that would start an empty cache start
this one instead: how an export with a ``kv_cache`` entry loads (through ``compressor.kvcache``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from compressor.arch import attention_geometry
from compressor.arch.generic import adapter_of
from compressor.kvcache.layer import QuantizedCacheLayer, install_cache
from compressor.weights.values import (
    BFP_BLOCK_SIZES,
    BFP_EXPONENT_BITS,
    BFP_MANTISSA_BITS,
    BFP_ROUNDING,
    bfp_blocks,
    bfp_decode,
    bfp_encode,
)

SCOPES = ("token", "head")


@dataclass(frozen=True)
class BFPCacheSpec:
    """What the cache stores; the ``kv_cache`` entry of an export's ``quantization_config``."""

    k_bits: int = 4  # key mantissa bits, sign included
    v_bits: int | None = None  # value mantissa bits; None keeps values in the model dtype
    block_size: int = 32
    scope: str = "token"
    rounding: str = "nearest_even"
    quantize_fresh: bool = True
    k_perm: bool = False  # the checkpoint holds each layer's key-channel permutation (``k_perm`` buffers)
    v_perm: bool = False

    method = "bfp"

    def __post_init__(self):
        for key, bits in (("k_bits", self.k_bits), ("v_bits", self.v_bits)):
            if bits is not None and bits not in BFP_MANTISSA_BITS:
                raise ValueError(f"{key}: {bits} is not one of {', '.join(map(str, BFP_MANTISSA_BITS))}")
        if self.block_size not in BFP_BLOCK_SIZES:
            raise ValueError(f"block_size: {self.block_size} is not one of {', '.join(map(str, BFP_BLOCK_SIZES))}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope: {self.scope!r} is not one of {', '.join(SCOPES)}")
        if self.rounding not in BFP_ROUNDING:
            raise ValueError(f"rounding: {self.rounding!r} is not one of {', '.join(BFP_ROUNDING)}")

    def check_geometry(self, head_dim: int) -> None:
        if self.scope == "head" and head_dim % self.block_size:
            raise ValueError(
                f"block_size: {self.block_size} does not divide head_dim {head_dim}, so blocks would straddle heads; "
                "use scope 'token' or a block size that divides head_dim"
            )

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, entry: dict) -> BFPCacheSpec:
        entry = dict(entry)
        method = entry.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"kv_cache method {method!r} is not known (known: {cls.method!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in entry.items() if k in known})


def stored_bytes(channels: int, bits: int, block_size: int) -> int:
    """Bytes of one token's BFP vector as this cache holds it: packed mantissas plus exponent bytes."""
    return mantissa_bytes(channels, bits) + bfp_blocks(channels, block_size) * BFP_EXPONENT_BITS // 8


def mantissa_bytes(channels: int, bits: int) -> int:
    return (channels + 1) // 2 if bits == 4 else channels  # 4 bits: two a byte; wider: one a byte


def cache_bytes_per_token(
    spec: BFPCacheSpec, num_layers: int, kv_heads: int, head_dim: int, baseline_bytes: int = 2
) -> dict:
    """K (and V) bytes per token over all layers, against ``baseline_bytes`` per value (bf16: 2)."""
    channels = kv_heads * head_dim
    dense = num_layers * channels * baseline_bytes
    k = num_layers * stored_bytes(channels, spec.k_bits, spec.block_size)
    v = dense if spec.v_bits is None else num_layers * stored_bytes(channels, spec.v_bits, spec.block_size)
    return {
        "k_bytes_per_token": k,
        "v_bytes_per_token": v,
        "dense_bytes_per_token": dense,
        "k_ratio": k / dense,
        "kv_ratio": (k + v) / (2 * dense),
    }


def pack_mantissas(mantissas: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., C] -> the bytes the cache holds: at 4 bits two a byte (low nibble = even channel)."""
    if bits != 4:
        return mantissas
    if mantissas.shape[-1] % 2:
        mantissas = torch.nn.functional.pad(mantissas, (0, 1))
    return mantissas[..., 0::2] | (mantissas[..., 1::2] << 4)


def unpack_mantissas(packed: torch.Tensor, bits: int, channels: int) -> torch.Tensor:
    if bits != 4:
        return packed
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)[..., :channels]


class BFPVectors:
    """One layer's stored vectors (keys or values): mantissas and exponents [B, T, ...], appended per token."""

    def __init__(self, bits: int, block_size: int, rounding: str, perm: torch.Tensor | None):
        self.bits, self.block_size, self.rounding = bits, block_size, rounding
        self.perm = perm
        self.inverse = None if perm is None else torch.argsort(perm)
        self.mantissas = self.exponents = None

    def append(self, flat: torch.Tensor) -> None:
        """``flat`` [B, T, C] in the model's channel order."""
        if self.perm is not None:
            flat = flat[..., self.perm.to(flat.device)]
        mantissas, exponents = bfp_encode(flat, self.bits, self.block_size, self.rounding)
        mantissas = pack_mantissas(mantissas, self.bits)
        if self.mantissas is None:
            self.mantissas, self.exponents = mantissas, exponents
        else:
            self.mantissas = torch.cat([self.mantissas, mantissas], dim=1)
            self.exponents = torch.cat([self.exponents, exponents], dim=1)

    def decode(self, channels: int, dtype: torch.dtype) -> torch.Tensor:
        """[B, T, C] dequantized, back in the model's channel order."""
        values = bfp_decode(
            unpack_mantissas(self.mantissas, self.bits, channels), self.exponents, self.bits, self.block_size, dtype
        )
        return values if self.inverse is None else values[..., self.inverse.to(values.device)]

    def nbytes(self) -> int:
        return 0 if self.mantissas is None else self.mantissas.numel() + self.exponents.numel()

    def select(self, index: torch.Tensor) -> None:
        if self.mantissas is not None:
            self.mantissas = self.mantissas.index_select(0, index.to(self.mantissas.device))
            self.exponents = self.exponents.index_select(0, index.to(self.exponents.device))


def _flat(states: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H * D]"""
    b, h, t, d = states.shape
    return states.transpose(1, 2).reshape(b, t, h * d)


def _unflat(flat: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, c = flat.shape
    return flat.reshape(b, t, heads, c // heads).transpose(1, 2)


class BFPLayer(QuantizedCacheLayer):
    """One layer of ``BFPQuantizedCache``: keys (and, with ``v_bits``, values) held as BFP bytes."""

    def __init__(self, spec: BFPCacheSpec, k_perm: torch.Tensor | None = None, v_perm: torch.Tensor | None = None):
        super().__init__(spec)
        self.k_perm, self.v_perm = k_perm, v_perm

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.heads, self.head_dim = key_states.shape[1], key_states.shape[3]
        self.spec.check_geometry(self.head_dim)
        channels = self.heads * self.head_dim
        for name, perm in (("k_perm", self.k_perm), ("v_perm", self.v_perm)):
            if perm is not None and (
                perm.numel() != channels
                or not torch.equal(torch.sort(perm.flatten().long()).values, torch.arange(channels, device=perm.device))
            ):
                raise ValueError(f"{name} is not a permutation of the layer's {channels} key channels")
        flat = lambda p: None if p is None else p.flatten().long()  # noqa: E731
        self._keys = BFPVectors(self.spec.k_bits, self.spec.block_size, self.spec.rounding, flat(self.k_perm))
        self._values = (
            None
            if self.spec.v_bits is None
            else BFPVectors(self.spec.v_bits, self.spec.block_size, self.spec.rounding, flat(self.v_perm))
        )
        self.values = None
        self.is_initialized = True

    @property
    def quantizes_values(self) -> bool:
        return self._values is not None

    def store_keys(self, key_states: torch.Tensor) -> torch.Tensor:
        self._keys.append(_flat(key_states))
        return _unflat(self._keys.decode(self.heads * self.head_dim, key_states.dtype), self.heads)

    def store_values(self, value_states: torch.Tensor) -> torch.Tensor:
        self._values.append(_flat(value_states))
        return _unflat(self._values.decode(self.heads * self.head_dim, value_states.dtype), self.heads)

    def nbytes(self) -> dict:
        """Bytes this layer holds for keys and values."""
        values = (
            self._values.nbytes()
            if self._values is not None
            else (0 if self.values is None else self.values.numel() * self.values.element_size())
        )
        return {"k": self._keys.nbytes() if self.is_initialized else 0, "v": values if self.is_initialized else 0}

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self._keys.select(indices)
        if self._values is not None:
            self._values.select(indices)
        elif self.values is not None:
            self.values = self.values.index_select(0, indices.to(self.values.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.batch_select_indices(torch.arange(self._keys.mantissas.shape[0]).repeat_interleave(repeats))


class BFPQuantizedCache(Cache):
    """The KV cache of a decoder-only model with K (and optionally V) in BFP, one ``BFPLayer`` per layer.

    ``k_perms``: per layer, the permutation of its ``H_kv * head_dim`` key channels (int [H_kv * D]
    or [H_kv, D] flattened, new position a <- channel perm[a]), or None for the identity."""

    def __init__(self, spec: BFPCacheSpec, num_layers: int, k_perms=None, v_perms=None):
        k_perms = list(k_perms) if k_perms is not None else [None] * num_layers
        v_perms = list(v_perms) if v_perms is not None else [None] * num_layers
        if len(k_perms) != num_layers or len(v_perms) != num_layers:
            raise ValueError(
                f"one permutation per layer is needed: {num_layers} layers, {len(k_perms)} key and {len(v_perms)} "
                "value permutations"
            )
        self.spec = spec
        super().__init__(layers=[BFPLayer(spec, k, v) for k, v in zip(k_perms, v_perms)])

    def nbytes(self) -> dict:
        totals = {"k": 0, "v": 0}
        for layer in self.layers:
            for key, value in layer.nbytes().items():
                totals[key] += value
        return totals


def attention_modules(model) -> list:
    """Each decoder layer's attention module (the paths of the model's ``arch`` adapter)."""
    adapter = adapter_of(model, model.config)
    return [layer.get_submodule(adapter.attention) for layer in model.get_submodule(adapter.blocks)]


def model_kv_perms(model) -> tuple[list, list]:
    """The ``k_perm`` / ``v_perm`` buffers of each decoder layer's attention (None where absent)."""
    attentions = attention_modules(model)
    return [getattr(a, "k_perm", None) for a in attentions], [getattr(a, "v_perm", None) for a in attentions]


def prepare(model, spec: BFPCacheSpec, device="meta") -> list[str]:
    """Empty int32 ``k_perm`` (and ``v_perm``) buffers [H_kv * D] on every attention module, for a
    loader to fill from a checkpoint whose spec says it has them; their full names."""
    geometry = attention_geometry(model.config)
    channels = geometry.num_kv_heads * geometry.head_dim
    names = []
    adapter = adapter_of(model, model.config)
    for index, attention in enumerate(attention_modules(model)):
        for key in ("k_perm", "v_perm"):
            if getattr(spec, key):
                attention.register_buffer(key, torch.empty(channels, dtype=torch.int32, device=device))
                names.append(f"{adapter.blocks}.{index}.{adapter.attention}.{key}")
    return names


def install(model, spec: BFPCacheSpec):
    """From now on, every forward of ``model`` (a transformers causal LM) that would start an empty
    cache starts a ``BFPQuantizedCache`` with the layers' ``k_perm`` buffers instead; ``generate``'s
    own empty ``DynamicCache`` is swapped too. A cache the caller passes that holds tokens is kept.
    Returns the hook's handle (``compressor.kvcache.install`` keeps it)."""

    def start_bfp_cache(module):
        k_perms, v_perms = model_kv_perms(module)
        return BFPQuantizedCache(spec, len(k_perms), k_perms, v_perms)

    return install_cache(model, start_bfp_cache)


def bytes_per_token(model, spec: BFPCacheSpec) -> dict:
    geometry = attention_geometry(model.config)
    return cache_bytes_per_token(spec, model.config.num_hidden_layers, geometry.num_kv_heads, geometry.head_dim)


def describe(summary: dict) -> str:
    values = "values unquantized" if summary["v_bits"] is None else f"values {summary['v_bits']}-bit mantissas"
    prompt = "prompt included" if summary["quantize_fresh"] else "prompt (first half of each window) exact"
    return (
        f"BFP keys {summary['k_bits']}-bit mantissas, block {summary['block_size']} ({summary['scope']}), {values}, "
        f"{prompt}; K-cache {summary['k_bytes_per_token']} bytes/token vs {summary['dense_bytes_per_token']} in bf16 "
        f"({summary['k_ratio']:.3f}x)"
    )


Spec = BFPCacheSpec  # the channel's name for this method's spec (``compressor/kvcache/__init__.py``)
