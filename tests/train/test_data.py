import gzip

import numpy as np
import pytest
import torch

from bitnet.train import get_batch, load_corpus


def test_text_file_split_and_batches(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(bytes(range(256)) * 4)
    c = load_corpus(f, val_fraction=0.25)
    assert len(c.train) == 768 and len(c.val) == 256 and c.train.dtype == np.uint8
    assert bytes(c.val[:3]) == bytes([0, 1, 2])
    x, y = get_batch(c.train, 5, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal((x + 1) % 256, y)   # y is x shifted by one byte
    with pytest.raises(ValueError, match="seq_len"):
        get_batch(c.val, 1, 256)


def test_folder_is_read_recursively(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.py").write_text("print('x')\n" * 10)
    (tmp_path / "y.txt").write_text("hello\n" * 10)
    (tmp_path / "skip.bin").write_bytes(b"\x00" * 1000)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "z.txt").write_text("secret" * 100)
    c = load_corpus(tmp_path, val_fraction=0.1)
    text = bytes(np.concatenate([c.train, c.val])).decode()
    assert "print('x')" in text and "hello" in text and "secret" not in text and "\x00" not in text
    with pytest.raises(ValueError, match="no files"):
        load_corpus(tmp_path / "sub", patterns=("*.md",))


def test_enwik8_split_and_gzip(tmp_path):
    data = bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8))
    (tmp_path / "enwik8").write_bytes(data)
    (tmp_path / "enwik8.gz").write_bytes(gzip.compress(data))
    for name in ("enwik8", "enwik8.gz"):
        c = load_corpus(tmp_path / name)
        assert bytes(c.train) == data[:900] and bytes(c.val) == data[900:950]


def test_default_corpus_and_errors(tmp_path):
    c = load_corpus("default")
    assert c.name in ("kjv", "stdlib") and len(c.train) > 1_000_000
    if c.name == "kjv":
        assert bytes(c.train[:40]).decode().startswith("In the beginning God created")
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_corpus(tmp_path / "nothere")
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus("default", val_fraction=0)
