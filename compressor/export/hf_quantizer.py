"""Plain transformers loads our native checkpoints: ``AutoModelForCausalLM.from_pretrained(out)``.

``import compressor`` registers ``quant_method: "compressor"`` with transformers
(``register_quantization_config`` / ``register_quantizer`` from ``transformers.quantizers.auto``).
Loading then goes:

1. before the weights are read, every module named in ``quantization_config["modules"]`` is swapped
   for a ``CheckpointLinear`` whose parameters carry exactly the checkpoint's tensor names and
   shapes (``export/native.py``, its layouts), so transformers' own loader fills them;
2. after loading, each is replaced by our ``QuantizedLinear`` (LUT Triton kernel on a GPU, torch
   reference on a CPU) and the packed codes are unpacked once.

3. with a ``kv_cache`` entry (``compressor/kvcache``): the cache method prepares the model before
   loading (BFP: ``k_perm`` buffers), and after it every forward and ``generate`` that starts a cache
   starts the declared one.
4. with an ``online_hadamard`` entry (the ``rotate`` step's): the MLPs it names become
   ``OnlineHadamardMLP`` before loading, so their ``online_hadamard`` factors load into them.

Without ``import compressor`` transformers does not know the method, warns, and loads random weights
for the quantized layers: import it first. ``model.dequantize()`` gives a plain dense model.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from compressor import kvcache
from compressor.export import native
from compressor.modules.hadamard import install_online_hadamard
from compressor.modules.linear import QuantizedLinear, dequantize_model_
from compressor.moe import model_name, unfuse_model_experts


class CompressorConfig(QuantizationConfigMixin):
    """``quantization_config`` of our native format; keeps every key it is given (see native.py)."""

    def __init__(
        self,
        format: str = native.UNKINDED_ENTRY,
        version: int = native.FORMAT_VERSION,
        modules: dict | None = None,
        ignore: list | None = None,
        **kwargs,
    ):
        self.quant_method = native.QUANT_METHOD
        self.format = format
        self.version = version
        self.modules = dict(modules or {})
        self.ignore = list(ignore or [])
        for key, value in kwargs.items():
            if key != "quant_method":
                setattr(self, key, value)
        self.post_init()

    def post_init(self):
        if self.version > native.FORMAT_VERSION:
            raise ValueError(
                f"compressor checkpoint format version {self.version} is newer than this compressor reads "
                f"({native.FORMAT_VERSION}); upgrade compressor"
            )
        if self.format not in native.FORMATS:
            raise ValueError(
                f"compressor checkpoint format {self.format!r} is not supported (known: {', '.join(native.FORMATS)})"
            )


class CheckpointLinear(nn.Module):
    """Holds one quantized module's checkpoint tensors while transformers loads them."""

    def __init__(self, entry: dict, in_features: int, out_features: int, bias: bool, float_dtype: torch.dtype):
        super().__init__()
        self.entry = entry
        for name, spec in native.tensor_specs(entry, (out_features, in_features)).items():
            dtype = spec.dtype or float_dtype
            self.register_parameter(
                name, nn.Parameter(torch.empty(spec.shape, dtype=dtype, device="meta"), requires_grad=False)
            )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=float_dtype, device="meta"), requires_grad=False)
            if bias
            else None
        )

    def to_quantized(self, name: str) -> QuantizedLinear:
        tensors = {key: value.data for key, value in self.named_parameters() if key != "bias"}
        if any(t.is_meta for t in tensors.values()):
            raise ValueError(
                f"{name}: the checkpoint lacks some of its tensors "
                f"({', '.join(k for k, t in tensors.items() if t.is_meta)})"
            )
        try:
            weight = native.from_tensors(tensors, self.entry)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        module = QuantizedLinear(weight, None if self.bias is None else self.bias.data)
        native.INPUTS.attach(module, tensors, self.entry)
        return module


class CompressorHfQuantizer(HfQuantizer):
    requires_calibration = True  # only checkpoints we wrote; transformers cannot quantize into this format
    required_packages = ["compressor"]

    def _process_model_before_weight_loading(self, model, **kwargs):
        kv_cache = getattr(self.quantization_config, "kv_cache", None)
        if kv_cache:
            kvcache.prepare(model, kv_cache)
        moe = unfuse_model_experts(model, model.config)  # experts as per-expert linears, as the export has them
        install_online_hadamard(model, getattr(self.quantization_config, "online_hadamard", None) or {})
        for stored, entry in self.quantization_config.modules.items():
            name = model_name(moe, stored) if moe is not None else stored
            try:
                linear = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{name}: named in quantization_config.modules but not in the model") from None
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"{name}: expected a Linear module, found {type(linear).__name__}")
            model.set_submodule(
                name,
                CheckpointLinear(
                    entry, linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype
                ),
            )
        return model

    def get_new_dtype(self, converter, param, dtype):
        return None  # codebooks and outlier values keep their stored dtype (fp16); the rest arrive as the skeleton's

    def _process_model_after_weight_loading(self, model, **kwargs):
        moe = unfuse_model_experts(model, model.config)  # the adapter (the experts are unfused already)
        for stored in self.quantization_config.modules:
            name = model_name(moe, stored) if moe is not None else stored
            placeholder = model.get_submodule(name)
            if isinstance(placeholder, CheckpointLinear):
                model.set_submodule(name, placeholder.to_quantized(name))
        kv_cache = getattr(self.quantization_config, "kv_cache", None)
        if kv_cache:
            kvcache.install(model, kv_cache)
        native.INPUTS.install_attention(model, self.quantization_config.to_dict())
        return model

    def _dequantize(self, model, dtype=None):
        dequantize_model_(model, dtype or torch.float32)
        return model

    def is_serializable(self, *args, **kwargs):
        return False  # write exports with compressor; a loaded model does not save back into this format

    @property
    def is_trainable(self):
        return False


def register() -> None:
    """Make ``quant_method: "compressor"`` known to transformers (idempotent: the decorators raise on a
    second registration)."""
    if native.QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(native.QUANT_METHOD)(CompressorConfig)
    if native.QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(native.QUANT_METHOD)(CompressorHfQuantizer)
    register_expert_renames()


def register_expert_renames() -> None:
    """A native checkpoint of a MoE family whose checkpoint names differ from transformers' (Mixtral's
    ``block_sparse_moe``) has model type ``compressor_<family>``, which transformers' own renaming does not
    cover: teach it the renaming (the experts stay per-expert modules: ``compressor.moe``)."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )
    from transformers.core_model_loading import WeightRenaming

    from compressor.arch import ADAPTERS

    for adapter in ADAPTERS:
        model_type = f"compressor_{adapter.family}"
        renames = adapter.experts.checkpoint_renames if adapter.experts is not None else ()
        if renames and get_checkpoint_conversion_mapping(model_type) is None:
            register_checkpoint_conversion_mapping(
                model_type, [WeightRenaming(theirs, ours) for ours, theirs in renames]
            )


register()
