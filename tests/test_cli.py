"""The ``bitnet`` command end to end: train through ``python -m bitnet``, resume, generate."""

import csv
import json
import os
import subprocess
import sys

import pytest

from bitnet.cli import SUBCOMMANDS, build_parser, main
from bitnet.generate import BitNetInference


def run_cli(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "bitnet", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=240)


def test_train_resume_generate_through_the_cli(tmp_path, capsys):
    data = tmp_path / "tiny.txt"
    data.write_text("In the beginning was the word, and the word was with the dog. " * 100)
    run = tmp_path / "run"
    common = ["--dim", "32", "--depth", "1", "--heads", "2", "--seq-len", "32", "--batch-size", "4",
              "--eval-every", "3", "--eval-batches", "1", "--no-progress", "--no-plot", "--device", "cpu"]
    first = run_cli("train", "--data", data, "--out", run, "--steps", "6", "--stop-at", "3", *common)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["steps"] == 3
    assert json.loads((run / "config.json").read_text())["train_state"]["step"] == 3
    assert (run / "model.safetensors").is_file() and (run / "optimizer.safetensors").is_file()

    # in-process from here on (each python start costs seconds of torch import on a busy CI box)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--no-progress", "--no-plot"]) == 0   # settings come from the run
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 6 and result["stopped"] == "steps"
    assert [int(r["step"]) for r in csv.DictReader(open(run / "log.csv"))] == [0, 3, 6]

    inf = BitNetInference(device="cpu")
    inf.load_model(run)
    text = inf.generate("The dog jumped over the ", 20, seed=0)
    assert isinstance(text, str) and len(text.encode("utf-8", "surrogatepass")) > 0

    assert main(["generate", str(run), "--prompt", "In the", "--max-new-tokens", "10", "--temperature", "0",
                 "--no-echo", "--device", "cpu"]) == 0
    expected = BitNetInference(device="cpu").load_model(run).generate("In the", 10, temperature=0)
    out = capsys.readouterr()
    assert out.out == expected + "\n" and "[length]" in out.err


def test_cli_registry_and_errors(tmp_path, capsys):
    assert "bitnet.train.cli" in SUBCOMMANDS and "bitnet.generate.cli" in SUBCOMMANDS
    help_text = build_parser().format_help()
    assert "train" in help_text and "generate" in help_text
    assert main([]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(tmp_path / "missing_run"), "--prompt", "x"])
    assert exc.value.code == 1 and "missing_run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "nothing"), "--resume"])
    assert exc.value.code == 1 and "nothing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--weights", "2"])
    assert "invalid choice" in capsys.readouterr().err


def test_train_on_several_files(tmp_path, capsys):
    files = []
    for i in range(2):
        files.append(tmp_path / f"part{i}.txt")
        files[-1].write_text(f"file {i} says hello to the dog. " * 40)
    assert main(["train", "--data", *map(str, files), "--out", str(tmp_path / "r"), "--steps", "1", "--dim", "16",
                 "--depth", "1", "--heads", "2", "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1",
                 "--no-progress", "--no-plot", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 1
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train_config"]["data"] == list(map(str, files))
