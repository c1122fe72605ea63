"""Calibration text -> ``samples x seq_len`` token batches, seeded and reproducible.

Sources: ``demo`` (the bundled calibration text), a local ``.txt``/``.jsonl``/``.json``/``.parquet``
file or a folder of them (read through ``datasets``' own loaders), or a ``datasets`` name. The text
is tokenized as one stream (documents joined by the EOS token) and ``samples`` windows of
``seq_len`` tokens are drawn at seeded random offsets, the convention of GPTQ and its successors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compressor.data_files import DATA_FILE_LOADERS, looks_local
from compressor.errors import UserError


class CalibrationError(UserError):
    pass


def load_texts(dataset: str, split: str = "train", text_column: str = "text") -> list[str]:
    """The documents of a calibration or evaluation source, as a list of strings."""
    if dataset == "demo":
        from compressor.demo import demo_text_path

        return [demo_text_path("calibration").read_text()]
    path = Path(dataset)
    if looks_local(dataset) and not path.exists():
        raise CalibrationError(f"{dataset}: no such file or folder")
    if path.is_file() and path.suffix == ".txt":
        return [read_text_file(path)]
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in DATA_FILE_LOADERS)
        if not files or any(f.suffix not in DATA_FILE_LOADERS for f in files):
            raise CalibrationError(f"{path}: expected .txt, .jsonl, .json or .parquet files")
        if all(f.suffix == ".txt" for f in files):
            return [read_text_file(f) for f in files]
        kinds = {DATA_FILE_LOADERS[f.suffix] for f in files}
        if len(kinds) != 1:
            raise CalibrationError(f"{path}: mixes file types {sorted(kinds)}; use one kind per folder")
        return _dataset_column(
            dataset, (kinds.pop(),), {"data_files": [str(f) for f in files], "split": "train"}, text_column
        )
    hub_reachable(dataset)
    return _dataset_column(dataset, (dataset,), {"split": split}, text_column)


def hub_reachable(dataset: str) -> None:
    """A hub dataset name needs the hub: refuse at once when it cannot be reached (``datasets`` retries for
    half a minute), unless ``HF_HUB_OFFLINE`` asks for a cached copy."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
    except OSError as error:
        raise CalibrationError(
            f"{dataset}: the Hugging Face hub is out of reach ({error.strerror or error}); use a local "
            ".txt/.jsonl/.parquet file, or HF_HUB_OFFLINE=1 for a cached copy"
        ) from None


def _dataset_column(source: str, args: tuple, kwargs: dict, text_column: str) -> list[str]:
    import datasets

    datasets.disable_progress_bars()  # our own progress lines say what runs
    try:
        data = datasets.load_dataset(*args, **kwargs)
    except Exception as error:
        raise CalibrationError(f"{source}: could not load the dataset ({type(error).__name__}: {error})") from None
    if text_column not in data.column_names:
        raise CalibrationError(f"{source}: no column '{text_column}' (columns: {', '.join(data.column_names)})")
    texts = [t for t in data[text_column] if t]
    wrong = next((t for t in texts if not isinstance(t, str)), None)
    if wrong is not None:
        raise CalibrationError(f"{source}: column '{text_column}' holds {type(wrong).__name__} values, not text")
    return texts


def read_text_file(path: Path) -> str:
    """A .txt source's text; one that is not UTF-8 (a binary file, Latin-1) is a one-line error."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CalibrationError(f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None


def tokenize_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one 1-D token stream, separated by the EOS token when there is one."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(stream: torch.Tensor, samples: int, seq_len: int, seed: int, source: str = "text") -> torch.Tensor:
    if stream.numel() < seq_len + 1:
        raise CalibrationError(f"{source}: only {stream.numel()} tokens, fewer than seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len, (samples,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def calibration_tokens(tokenizer, config) -> torch.Tensor:
    """``[samples, seq_len]`` token ids for a recipe's ``calibration`` section."""
    stream = tokenize_stream(tokenizer, load_texts(config.dataset, config.split, config.text_column))
    return sample_windows(stream, config.samples, config.seq_len, config.seed, config.dataset)
