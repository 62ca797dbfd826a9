import csv
import json

import pytest
import torch

from bitnet.io import load_model
from bitnet.train import TrainConfig, train

TINY = dict(steps=8, batch_size=4, seq_len=32, dim=32, depth=1, heads=2, eval_every=4, eval_batches=2,
            log_every=2, progress=False, plot=False, device="cpu", lr=3e-3)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "tiny.txt"
    f.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return f


def test_train_writes_log_checkpoint_and_learns(tmp_path, text_file):
    res = train(TrainConfig(data=str(text_file), out=str(tmp_path / "run"), **{**TINY, "steps": 12}))
    assert res["steps"] == 12 and res["final_val_loss"] < res["initial_val_loss"]
    assert res["final_val_bpb"] == pytest.approx(res["final_val_loss"] / 0.6931471805599453)
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert list(rows[0]) == ["step", "lr", "train_loss", "val_loss", "val_bpb", "tokens_per_s", "elapsed"]
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 6, 8, 10, 12]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["train_state"]["step"] == 12 and cfg["train_config"]["steps"] == 12
    model = load_model(tmp_path / "run")
    assert model.config["dim"] == 32 and model.config["max_seq_len"] == 32
    with pytest.raises(FileExistsError, match="resume"):
        train(TrainConfig(data=str(text_file), out=str(tmp_path / "run"), **TINY))


def test_stop_and_resume_equals_uninterrupted_run(tmp_path, text_file):
    straight = train(TrainConfig(data=str(text_file), out=str(tmp_path / "a"), **TINY))
    part = train(TrainConfig(data=str(text_file), out=str(tmp_path / "b"), stop_at=5, **TINY))
    assert part["steps"] == 5 and part["stopped"] == "stop_at"
    assert json.loads((tmp_path / "b" / "config.json").read_text())["train_state"]["step"] == 5
    rest = train(TrainConfig(data=str(text_file), out=str(tmp_path / "b"), resume=True, **TINY))
    assert rest["steps"] == 8
    a, b = load_model(tmp_path / "a").state_dict(), load_model(tmp_path / "b").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "b" / "log.csv"))]
    assert steps == [0, 2, 4, 5, 6, 8]
    with pytest.raises(FileNotFoundError, match="resume"):
        train(TrainConfig(data=str(text_file), out=str(tmp_path / "c"), resume=True, **TINY))


@pytest.mark.parametrize("weights", ["1", "fp"])
def test_other_weight_kinds_and_errors(tmp_path, text_file, weights):
    res = train(TrainConfig(data=str(text_file), out=str(tmp_path / weights), weights=weights,
                            **{**TINY, "steps": 2, "eval_every": 0}))
    assert load_model(tmp_path / weights).config["weights"] == weights and res["final_val_loss"] is not None
    with pytest.raises(ValueError, match="batch_size"):
        train(TrainConfig(data=str(text_file), out=str(tmp_path / "x"), **{**TINY, "batch_size": 0}))


def test_max_time_stops_with_a_final_eval_and_checkpoint(tmp_path, text_file):
    res = train(TrainConfig(data=str(text_file), out=str(tmp_path / "t"), max_time=0.0, **TINY))
    assert res["steps"] == 1 and res["stopped"] == "max_time"
    rows = list(csv.DictReader(open(tmp_path / "t" / "log.csv")))
    assert rows[-1]["step"] == "1" and rows[-1]["val_loss"] != ""
    assert json.loads((tmp_path / "t" / "config.json").read_text())["train_state"]["step"] == 1
