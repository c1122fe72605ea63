"""A transformers ``Cache`` that stores keys and values as FP8 E4M3 with one static scale per layer.

The scheme vLLM serves as ``kv_cache_dtype="fp8"`` with a checkpoint's ``k_scale`` / ``v_scale`` (one fp32 per
attention layer, named ``<layer>.self_attn.k_scale`` and ``v_scale``): a key (after RoPE) or value ``x`` is
stored as ``e4m3(x / s)`` (round to nearest even, saturating at 448; ``weights/values.py``) and read back as
``e4m3 * s``. The scales are calibrated by the ``fp8_kv`` step (``s = amax / 448`` over the calibration keys or
values of the layer). Each token is encoded on its own, so appending never re-quantizes.

``quantize_fresh`` (default True): the tokens of the current forward attend to their own quantized entries, so a
prefill (and ``compressor eval``) measures the quantized cache on the prompt as well.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from compressor.arch import adapter_for, attention_geometry
from compressor.kvcache.layer import QuantizedCacheLayer, install_cache
from compressor.weights.values import e4m3_codes, e4m3_values

SCALES = ("k_scale", "v_scale")


@dataclass(frozen=True)
class FP8CacheSpec:
    """The ``kv_cache`` entry of an export's ``quantization_config``."""

    values: bool = True  # values in FP8 too (False: keys only)
    quantize_fresh: bool = True

    method = "fp8"

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, entry: dict) -> FP8CacheSpec:
        entry = dict(entry)
        if entry.pop("method", cls.method) != cls.method:
            raise ValueError(f"kv_cache entry {entry} is not an fp8 cache")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in entry.items() if k in known})


def quantize_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uint8 E4M3 codes of ``x / scale``."""
    return e4m3_codes(x.float() / scale.float().to(x.device))


class FP8Layer(QuantizedCacheLayer):
    """One layer of ``FP8QuantizedCache``: E4M3 bytes of its keys (and values), appended per forward."""

    def __init__(self, spec: FP8CacheSpec, k_scale: torch.Tensor, v_scale: torch.Tensor):
        super().__init__(spec)
        self.k_scale, self.v_scale = k_scale.float(), v_scale.float()
        self.codes: dict[str, torch.Tensor | None] = {"k": None, "v": None}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.codes, self.values = {"k": None, "v": None}, None
        self.is_initialized = True

    @property
    def quantizes_values(self) -> bool:
        return self.spec.values

    def store_keys(self, key_states: torch.Tensor) -> torch.Tensor:
        return self.store("k", key_states, self.k_scale)

    def store_values(self, value_states: torch.Tensor) -> torch.Tensor:
        return self.store("v", value_states, self.v_scale)

    def store(self, name: str, states: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        codes = quantize_e4m3(states, scale)
        self.codes[name] = codes if self.codes[name] is None else torch.cat([self.codes[name], codes], dim=-2)
        return (e4m3_values(self.codes[name]) * scale.to(states.device)).to(states.dtype)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for name, codes in self.codes.items():
            if codes is not None:
                self.codes[name] = codes.index_select(0, indices.to(codes.device))
        if self.values is not None:
            self.values = self.values.index_select(0, indices.to(self.values.device))


class FP8QuantizedCache(Cache):
    """The KV cache of a decoder-only model in FP8 E4M3, one ``FP8Layer`` (with its two scales) per layer."""

    def __init__(self, spec: FP8CacheSpec, scales: list[tuple[torch.Tensor, torch.Tensor]]):
        self.spec = spec
        super().__init__(layers=[FP8Layer(spec, k, v) for k, v in scales])


def attention_modules(model) -> list:
    adapter = adapter_for(model.config)
    return [layer.get_submodule(adapter.attention) for layer in model.get_submodule(adapter.blocks)]


def prepare(model, spec: FP8CacheSpec, device="meta") -> list[str]:
    """fp32 [1] ``k_scale`` and ``v_scale`` buffers on every attention module, for a loader to fill; their names."""
    adapter, names = adapter_for(model.config), []
    for index, attention in enumerate(attention_modules(model)):
        for key in SCALES:
            attention.register_buffer(key, torch.ones(1, dtype=torch.float32, device=device))
            names.append(f"{adapter.blocks}.{index}.{adapter.attention}.{key}")
    return names


def install(model, spec: FP8CacheSpec):
    """Every forward of ``model`` that would start an empty cache starts an ``FP8QuantizedCache`` with the layers'
    scales; returns the hook's handle."""
    return install_cache(
        model, lambda module: FP8QuantizedCache(spec, [(a.k_scale, a.v_scale) for a in attention_modules(module)])
    )


def bytes_per_token(model, spec: FP8CacheSpec) -> dict:
    geometry = attention_geometry(model.config)
    dense = model.config.num_hidden_layers * geometry.num_kv_heads * geometry.head_dim * 2  # bf16
    k = dense // 2
    v = dense // 2 if spec.values else dense
    return {
        "k_bytes_per_token": k,
        "v_bytes_per_token": v,
        "dense_bytes_per_token": dense,
        "kv_ratio": (k + v) / (2 * dense),
    }


def describe(summary: dict) -> str:
    values = "values FP8" if summary["values"] else "values unquantized"
    stored = summary["k_bytes_per_token"] + summary["v_bytes_per_token"]
    return (
        f"FP8 E4M3 keys with a static scale per layer, {values}; K+V {stored} bytes/token vs "
        f"{2 * summary['dense_bytes_per_token']} in bf16 ({summary['kv_ratio']:.3f}x)"
    )


Spec = FP8CacheSpec  # the channel's name for this method's spec (``compressor/kvcache/__init__.py``)
