"""Measuring configs: the bounded autotuner behind ``COMPRESSOR_AUTOTUNE=on``, ``compressor tune``
and ``benchmarks/kernel_speed.py --tune``.

Bounded by construction: ``uniform.candidate_configs`` is a pruned list (at most ~16 configs per
key: the heuristic, a few tile widths and splits around it, and for M > 16 dequantize + cuBLAS),
each timed with a short ``do_bench`` (5 ms warm-up, 20 ms of repetitions). A config that fails to
compile or launch (shared memory, registers) is skipped. ``compressor.kernel_tuning.tune_weights`` /
``tune_checkpoint`` use it on a checkpoint's own layer shapes and write a table (``tables.py``);
this module imports nothing of the toolkit, so the dispatcher can use it.
"""

from __future__ import annotations

import statistics
import time


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
