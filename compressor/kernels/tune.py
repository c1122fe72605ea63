"""Measuring configs: the bounded autotuner behind ``COMPRESSOR_AUTOTUNE=on``, ``compressor tune``
and ``benchmarks/kernels.py --tune``.

Bounded by construction: ``uniform.candidate_configs`` is a pruned list (at most ~16 configs per
key: the heuristic, a few tile widths and splits around it, and for M > 16 dequantize + cuBLAS),
each timed with a short ``do_bench`` (5 ms warm-up, 20 ms of repetitions). A config that fails to
compile or launch (shared memory, registers) is skipped. ``tune_checkpoint`` tunes a checkpoint's
own layer shapes at a few M and writes a table (``tables.py``) the dispatcher then reads.
"""

from __future__ import annotations

import datetime
import statistics
import time

import torch


def time_ms(fn, on_gpu: bool) -> float:
    """Median milliseconds of ``fn()``: a short ``do_bench`` on a GPU, three wall-clock runs elsewhere."""
    if on_gpu:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(configs, run, on_gpu: bool) -> list[tuple[object, float | None]]:
    """(config, ms) for each config; ms is None where the config cannot run here."""
    timings = []
    for config in configs:
        try:
            run(config)  # compile outside the timing
            timings.append((config, time_ms(lambda config=config: run(config), on_gpu)))
        except Exception:  # out of shared memory / registers for this tile: not a candidate
            timings.append((config, None))
    return timings


def best_config(configs, run, on_gpu: bool = True):
    """The fastest config that runs (the first one when none does)."""
    ok = [(ms, i, config) for i, (config, ms) in enumerate(measure(configs, run, on_gpu)) if ms is not None]
    return min(ok)[2] if ok else configs[0]


def layer_signatures(model) -> dict:
    """One quantized weight per distinct (kind, bits, group, N, K) among a model's QuantizedLinears."""
    from compressor.kernels.dispatch import has_kernel, prepare
    from compressor.kernels.packing import PackedLUT
    from compressor.weights.linear import QuantizedLinear

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


def tune_weights(weights: dict, ms=(1, 16, 64, 256), dtype=torch.float16, device="cuda",
                 max_candidates: int | None = None, log=None) -> dict:
    """Table entries ``{key: config + provenance}`` for ``{signature: weight}`` at each M."""
    from compressor.kernels import uniform
    from compressor.kernels.dispatch import prepare, triton_linear
    from compressor.kernels.tables import table_key

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
            candidates = uniform.candidate_configs(m, n, k, group, device, bits, lut=kind == "lut")[:max_candidates]
            timings = measure(candidates, lambda config: triton_linear(x, weight, None, config), on_gpu)
            ok = [(ms_, i, config) for i, (config, ms_) in enumerate(timings) if ms_ is not None]
            if not ok:
                continue
            best_ms, _, best = min(ok)
            key = table_key(kind, bits, group, n, k, m)
            entries[key] = {**best.as_dict(), "us": round(best_ms * 1e3, 2),
                            "source": f"tuned on {name}, {today}, {len(ok)} candidates, {dtype}".replace("torch.", "")}
            if log:
                log(f"{key}: {best.schedule} {best_ms * 1e3:.1f} us")
    return entries


def tune_checkpoint(path, output, ms=(1, 16, 64, 256), device="cuda", dtype=torch.float16,
                    max_candidates: int | None = None, log=None) -> dict:
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
