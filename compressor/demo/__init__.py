"""The bundled demo model: a small Llama-architecture LM trained on the Python documentation.

It ships inside the package (``compressor/demo/model``) with its tokenizer and a calibration and a
held-out text split (``compressor/demo/data``), so every command works offline. How it was trained
and how good it is: ``compressor/demo/README.md``; the training script: ``scripts/train_demo.py``.
"""

from pathlib import Path

DEMO_DIR = Path(__file__).parent


def demo_model_dir() -> Path:
    path = DEMO_DIR / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the demo model is missing; rebuild it with scripts/train_demo.py")
    return path


def demo_moe_dir() -> Path:
    """``demo-moe``: a small mixture-of-experts model (Mixtral, 6 experts a layer, upcycled from the demo) on the
    demo's text and tokenizer (``scripts/train_demo_moe.py``)."""
    path = DEMO_DIR / "model-moe"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the demo-moe model is missing; rebuild it with scripts/train_demo_moe.py")
    return path


def demo_text_path(split: str) -> Path:
    """``calibration`` or ``heldout``."""
    if split not in ("calibration", "heldout"):
        raise ValueError(f"demo text split must be 'calibration' or 'heldout', not {split!r}")
    return DEMO_DIR / "data" / f"{split}.txt"
