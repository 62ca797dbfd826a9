import csv

import pytest

from bitnet.cli import SUBCOMMANDS, main
from bitnet.io import load_model
from bitnet.train import TrainConfig
from bitnet.train.compare import compare

TINY = dict(steps=3, batch_size=4, seq_len=32, dim=32, depth=1, heads=2, eval_every=2, eval_batches=1,
            log_every=1, progress=False, plot=False, device="cpu", lr=3e-3)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "tiny.txt"
    f.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return f


def test_compare_trains_each_kind_with_the_same_settings(tmp_path, text_file):
    rows = compare(TrainConfig(data=str(text_file), **TINY), out=tmp_path / "cmp")
    assert [r["weights"] for r in rows] == ["1.58", "1", "fp"]
    for r, name in zip(rows, ("b1.58", "b1", "fp")):
        assert r["run_dir"] == str(tmp_path / "cmp" / name) and r["steps"] == 3
        assert r["val_bpb"] == pytest.approx(r["final_val_loss"] / 0.6931471805599453)
        cfg = load_model(r["run_dir"]).config
        assert cfg["weights"] == r["weights"] and cfg["dim"] == 32
    assert rows[0]["initial_val_loss"] == rows[1]["initial_val_loss"] or rows[0]["params"] == rows[2]["params"]
    table = list(csv.DictReader(open(tmp_path / "cmp" / "compare.csv")))
    assert [t["weights"] for t in table] == ["1.58", "1", "fp"]
    assert set(table[0]) >= {"params", "final_train_loss", "final_val_loss", "val_bpb", "tokens_per_s", "time_s"}
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| b1.58 |" in md and "| b1 |" in md and "| fp |" in md
    pytest.importorskip("matplotlib")
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0


def test_compare_cli_and_errors(tmp_path, text_file, capsys):
    assert "bitnet.train.compare" in SUBCOMMANDS
    assert main(["compare", "--data", str(text_file), "--out", str(tmp_path / "c"), "--kinds", "1.58", "fp",
                 "--steps", "2", "--dim", "32", "--depth", "1", "--heads", "2", "--seq-len", "32",
                 "--batch-size", "4", "--eval-every", "0", "--eval-batches", "1", "--no-progress", "--no-plot",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| b1.58 |" in out and "| fp |" in out and "| b1 |" not in out
    assert (tmp_path / "c" / "b1.58" / "model.safetensors").is_file() and not (tmp_path / "c" / "b1").exists()
    with pytest.raises(ValueError, match="weights"):
        compare(TrainConfig(data=str(text_file), **TINY), weights=("2",), out=tmp_path / "bad")
