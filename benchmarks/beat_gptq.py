"""Score candidate recipes against GPTQ: every ``*.yaml`` of a folder through ``benchmarks/quality.py``'s own
entries and measurement (``recipe_entries``, ``run_benchmark``), on one model, with ``--quick``'s settings (32
held-out windows of 512 tokens, 32 calibration samples), one JSON line per row appended to OUTPUT. A row is
the row ``python benchmarks/quality.py --quick --only NAME`` gives for that recipe (same windows, calibration
and code), so candidates need not live in ``recipes/``.

    PYTHONPATH=. python benchmarks/beat_gptq.py benchmarks/results/beat-gptq/candidates demo OUT.jsonl [NAME ...]
    PYTHONPATH=. python benchmarks/beat_gptq.py FOLDER /work/second/model OUT.jsonl   # the second model: its own
        held-out text and calibration (data/heldout.txt, data/calibration.txt beside the model folder)
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path


def quality_module():
    """benchmarks/quality.py, imported by path (its folder holds a ``kernels.py`` that must not shadow the package)."""
    spec = importlib.util.spec_from_file_location("quality", Path(__file__).with_name("quality.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> None:
    folder, model, output, *only = argv
    quality = quality_module()
    data = Path(model).parent / "data"
    local = model != "demo"
    settings = quality.Settings(
        text=str(data / "heldout.txt") if local else "demo",
        calibration=str(data / "calibration.txt") if local else None,
        max_windows=32,
        calibration_samples=32,
    )
    entries = [e for e in quality.recipe_entries(Path(folder)) if not only or any(o in e.recipe for o in only)]
    for entry in entries:
        for row in quality.run_benchmark([model], [entry], settings):
            with Path(output).open("a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
