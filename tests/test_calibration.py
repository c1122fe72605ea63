"""Calibration sources and seeded token windows."""

import json

import pytest
import torch

from compressor.calibration import CalibrationError, load_texts, sample_windows, tokenize_stream
from compressor.recipe import CalibrationConfig
from compressor.testing import make_tokenizer

DOCS = ["first document about weights.", "second document about scales and zeros.", "third one."]


def test_local_sources_give_the_same_documents(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file")
    assert load_texts(str(tmp_path / "a.txt")) == ["plain text file"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"content": d}) for d in DOCS))
    assert load_texts(str(jsonl), text_column="content") == DOCS
    import pandas

    parquet_dir = tmp_path / "folder"
    parquet_dir.mkdir()
    pandas.DataFrame({"text": DOCS}).to_parquet(parquet_dir / "part.parquet")
    assert load_texts(str(parquet_dir)) == DOCS


def test_errors_name_the_source(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"body": "x"}))
    with pytest.raises(CalibrationError, match=r"d.jsonl: no column 'text' \(columns: body\)"):
        load_texts(str(jsonl))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CalibrationError, match="expected .txt, .jsonl"):
        load_texts(str(tmp_path / "x.csv"))
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CalibrationError, match=r"latin.txt: not UTF-8 text \(byte 3\)"):
        load_texts(str(tmp_path / "latin.txt"))
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("\n".join(json.dumps({"text": n}) for n in (1, 2)))
    with pytest.raises(CalibrationError, match="numbers.jsonl: column 'text' holds int values, not text"):
        load_texts(str(numbers))


def test_windows_are_seeded_and_in_bounds():
    stream = torch.arange(1000)
    a = sample_windows(stream, samples=16, seq_len=32, seed=3)
    assert a.shape == (16, 32)
    assert torch.equal(a, sample_windows(stream, 16, 32, 3))
    assert not torch.equal(a, sample_windows(stream, 16, 32, 4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(16, 31, dtype=torch.long))  # contiguous text
    with pytest.raises(CalibrationError, match="fewer than seq_len=2000"):
        sample_windows(stream, 1, 2000, 0)


def test_stream_separates_documents_with_eos():
    tokenizer = make_tokenizer()
    stream = tokenize_stream(tokenizer, DOCS)
    assert (stream == tokenizer.eos_token_id).sum() == len(DOCS)


def test_the_default_calibration_is_seeded_windows_of_the_demo_text():
    from transformers import AutoTokenizer

    from compressor.calibration import calibration_tokens
    from compressor.demo import demo_model_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    config = CalibrationConfig()
    windows = calibration_tokens(tokenizer, config)
    assert windows.shape == (config.samples, config.seq_len) and windows.dtype == torch.long
    assert torch.equal(windows, calibration_tokens(tokenizer, CalibrationConfig()))  # same seed, same windows
    other = calibration_tokens(tokenizer, CalibrationConfig(seed=1))
    assert not torch.equal(windows, other)
    stream = tokenize_stream(tokenizer, load_texts("demo"))
    first = windows[0]
    starts = (stream.unfold(0, config.seq_len, 1) == first).all(1).nonzero()
    assert len(starts) >= 1  # each window is a contiguous stretch of the demo's calibration text


def test_a_hub_dataset_out_of_reach_is_refused_at_once(monkeypatch):
    import socket
    import time

    def unreachable(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.monotonic()
    with pytest.raises(CalibrationError, match="someone/texts: the Hugging Face hub is out of reach"):
        load_texts("someone/texts")
    assert time.monotonic() - start < 5
