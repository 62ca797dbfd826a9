"""A load reads a run folder's config.json once: counted with an audit hook on every ``open`` of the file
(real files, real loads; nothing patched)."""

import sys
from pathlib import Path

import pytest
import torch

import bitnet
from bitnet import BitNetTransformer
from bitnet.io import load_checkpoint, load_model, save_checkpoint
from bitnet.tokenizer import ByteTokenizer

_watched: list = []          # [path of the config.json being counted, number of opens]


def _audit(event, args):
    if event == "open" and _watched and args and isinstance(args[0], (str, bytes, Path)):
        try:
            if Path(args[0].decode() if isinstance(args[0], bytes) else args[0]).resolve() == _watched[0]:
                _watched[1] += 1
        except (OSError, ValueError):
            pass


sys.addaudithook(_audit)      # audit hooks cannot be removed: it counts only while _watched is set


def opens_of(config_file: Path, fn):
    """(result of ``fn()``, how many times ``fn`` opened ``config_file``)."""
    _watched[:] = [Path(config_file).resolve(), 0]
    try:
        result = fn()
    finally:
        count = _watched[1]
        _watched.clear()
    return result, count


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = BitNetTransformer(num_tokens=260, dim=32, depth=1, heads=2, max_seq_len=16)
    folder = tmp_path_factory.mktemp("run")
    save_checkpoint(folder, model, tokenizer=ByteTokenizer(special_tokens=("<eos>",)))
    return folder


def test_the_counter_counts(run_dir):
    def read_twice():
        (run_dir / "config.json").read_text()
        with open(run_dir / "config.json", "rb"):
            pass
    assert opens_of(run_dir / "config.json", read_twice)[1] == 2


def test_load_model_reads_config_json_once(run_dir):
    model, count = opens_of(run_dir / "config.json", lambda: load_model(run_dir))
    assert isinstance(model, BitNetTransformer) and count == 1


def test_load_model_of_the_weights_file_reads_the_config_beside_it_once(run_dir):
    model, count = opens_of(run_dir / "config.json", lambda: load_model(run_dir / "model.safetensors"))
    assert model.config["dim"] == 32 and count == 1


def test_load_checkpoint_returns_the_config_it_read(run_dir):
    (model, saved), count = opens_of(run_dir / "config.json", lambda: load_checkpoint(run_dir))
    assert count == 1 and saved["model_config"]["dim"] == 32 and saved["tokenizer"]["type"] == "bytes"
    _, again = opens_of(run_dir / "config.json", lambda: load_checkpoint(run_dir, run_config=saved))
    assert again == 0                                      # handed on: not read at all


@pytest.mark.parametrize("name", ["", "model.safetensors"])
def test_bitnet_load_reads_config_json_once(run_dir, name):
    # detection, model config, tokenizer: one read of config.json for the whole bitnet.load
    loaded, count = opens_of(run_dir / "config.json", lambda: bitnet.load(run_dir / name if name else run_dir,
                                                                          device="cpu"))
    assert count == 1
    assert loaded.tokenizer.vocab_size == 257 and loaded.packed    # the tokenizer came from that one read
