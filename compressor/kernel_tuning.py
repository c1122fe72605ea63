"""``compressor tune``: the kernels' configs for an exported checkpoint's own layer shapes.

Loads the export, takes one quantized weight per distinct (kind, bits, group, N, K), times the
bounded candidate list of each at the requested M with the tuner's timing (``kernels/tune.py``) and
writes (merges) a kernel-config table (``kernels/tables.py``) that the dispatcher reads first when
``COMPRESSOR_KERNEL_CONFIGS`` names it. It lives outside ``kernels/`` because it loads an export
and walks ``QuantizedLinear`` modules, which the kernels never import.
"""

from __future__ import annotations

import datetime

import torch


def layer_signatures(model) -> dict:
    """One quantized weight per distinct (kind, bits, group, N, K) among a model's QuantizedLinears."""
    from compressor.kernels.dispatch import has_kernel, prepare
    from compressor.kernels.packing import PackedLUT
    from compressor.modules.linear import QuantizedLinear

    found = {}
    for module in model.modules():
        if not isinstance(module, QuantizedLinear) or not has_kernel(module.quantized_weight):
            continue
        weight = module.quantized_weight
        dense, _ = prepare(weight)
        if dense is None:
            continue
        kind = "lut" if isinstance(dense, PackedLUT) else "uniform"
        signature = (kind, dense.bits, getattr(dense, "group_size", -1), *dense.shape)
        found.setdefault(signature, weight)
    return found


def tune_weights(
    weights: dict, ms=(1, 16, 64, 256), dtype=torch.float16, device="cuda", max_candidates: int | None = None, log=None
) -> dict:
    """Table entries ``{key: config + provenance}`` for ``{signature: weight}`` at each M."""
    from compressor.kernels.dispatch import prepare, triton_linear
    from compressor.kernels.heuristics import candidate_configs
    from compressor.kernels.tables import table_key
    from compressor.kernels.tune import measure

    device = torch.device(device)
    on_gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    today = datetime.date.today().isoformat()
    entries = {}
    generator = torch.Generator(device=device).manual_seed(0)
    for (kind, bits, group, n, k), weight in weights.items():
        dense, outliers = prepare(weight)
        for m in ms:
            x = torch.randn(m, k, generator=generator, device=device).to(dtype)
            candidates = candidate_configs(m, n, k, group, device, bits, lut=kind == "lut")[:max_candidates]
            timings = measure(candidates, lambda config: triton_linear(x, weight, None, config), on_gpu)
            ok = [(ms_, i, config) for i, (config, ms_) in enumerate(timings) if ms_ is not None]
            if not ok:
                continue
            best_ms, _, best = min(ok)
            key = table_key(kind, bits, group, n, k, m)
            entries[key] = {
                **best.as_dict(),
                "us": round(best_ms * 1e3, 2),
                "source": f"tuned on {name}, {today}, {len(ok)} candidates, {dtype}".replace("torch.", ""),
            }
            if log:
                log(f"{key}: {best.schedule} {best_ms * 1e3:.1f} us")
    return entries


def tune_checkpoint(
    path, output, ms=(1, 16, 64, 256), device="cuda", dtype=torch.float16, max_candidates: int | None = None, log=None
) -> dict:
    """Tune an exported checkpoint's own layer shapes and write (merge) the table at ``output``."""
    from compressor.export import load_quantized_model
    from compressor.kernels.tables import write_table

    device = torch.device(device)
    model = load_quantized_model(path, dtype=dtype, device=device)
    signatures = layer_signatures(model)
    entries = tune_weights(signatures, ms, dtype, device, max_candidates, log)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    about = f"tuned by `compressor tune` for {path} on {name}"
    written = write_table(output, entries, name, about)
    return {"table": str(written), "entries": len(entries), "shapes": len(signatures), "device": name}
