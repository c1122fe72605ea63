"""Local calibration and evaluation text: which files we read, and whether a source names a path.

Light on purpose (no torch): the recipe checks its ``dataset`` key with it before any work, and
``calibration.py`` loads the files.
"""

from __future__ import annotations

from pathlib import Path

# a local data file's suffix -> the `datasets` builder that reads it
DATA_FILE_LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def looks_local(dataset: str) -> bool:
    """A calibration source that is a path, not a hub dataset name: a data file's suffix, or a path's start."""
    return Path(dataset).suffix in DATA_FILE_LOADERS or dataset.startswith((".", "/", "~"))
