"""train_bpe_tokenizer: offline byte-level BPE saved beside a model, loaded by AutoTokenizer."""

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from bitnet.hf import train_bpe_tokenizer  # noqa: E402

TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void.\n" * 40


def test_train_save_autotokenizer_roundtrip(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT)
    tok = train_bpe_tokenizer(str(tmp_path / "corpus.txt"), vocab_size=300, save_dir=tmp_path / "model")
    assert len(tok) <= 300 and tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    sample = "And God said, Let there be light: ünïcödé ✓"
    ids = loaded(sample).input_ids
    assert loaded.decode(ids) == sample                                  # byte-level: nothing unknown
    assert len(ids) < len(sample.encode())                               # merges were learned
    assert ids == tok(sample).input_ids


def test_vocab_size_validated():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(TEXT, vocab_size=100)
