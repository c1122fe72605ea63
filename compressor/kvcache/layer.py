"""What every quantized KV-cache layer shares: the transformers ``DynamicLayer`` bookkeeping around storing
keys (and, where the method quantizes them, values) in its own encoding. A method's layer says how it stores
(``store_keys``, ``store_values``) and whether values are quantized (``quantizes_values``); appending, the
sequence length, the mask sizes, ``quantize_fresh`` and resets live here once."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class QuantizedCacheLayer(DynamicLayer):
    """One layer of a quantized cache; ``spec.quantize_fresh`` (False: the tokens of the current forward attend
    to their own unquantized keys and values, the quantized cache only to later tokens)."""

    is_croppable = False

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.cumulative_length = 0

    @property
    def quantizes_values(self) -> bool:
        raise NotImplementedError

    def store_keys(self, key_states: torch.Tensor) -> torch.Tensor:
        """Append ``key_states`` in the cache's encoding; every key so far, decoded."""
        raise NotImplementedError

    def store_values(self, value_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, key_states, value_states, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        fresh = key_states.shape[-2]
        self.cumulative_length += fresh
        keys = self.store_keys(key_states)
        if self.quantizes_values:
            values = self.store_values(value_states)
        else:
            self.values = value_states if self.values is None else torch.cat([self.values, value_states], dim=-2)
            values = self.values
        if not self.spec.quantize_fresh:
            keys = torch.cat([keys[..., :-fresh, :], key_states], dim=-2)
            values = torch.cat([values[..., :-fresh, :], value_states], dim=-2)
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def reset(self) -> None:
        self.cumulative_length = 0
        self.is_initialized = False
        self.values = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)


def install_cache(model, make_cache):
    """Every forward of ``model`` that would start an empty cache starts ``make_cache(model)`` instead
    (``generate``'s own empty ``DynamicCache`` too); returns the hook's handle."""

    def start_cache(module, args, kwargs):
        name = "cache" if "cache" in kwargs or "past_key_values" not in kwargs else "past_key_values"
        given = kwargs.get(name)
        use_cache = kwargs.get("use_cache")
        if use_cache is False or (use_cache is None and not getattr(module.config, "use_cache", True)):
            return None
        if given is None or (type(given) is DynamicCache and given.get_seq_length() == 0):
            kwargs[name] = make_cache(module)
            kwargs["use_cache"] = True
            return args, kwargs
        return None

    return model.register_forward_pre_hook(start_cache, with_kwargs=True)
