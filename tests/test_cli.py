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


# ------------------------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny trained run folder (config.json with train_config / train_state, model, optimizer)."""
    from bitnet.train import TrainConfig, train

    root = tmp_path_factory.mktemp("cli_bad")
    data = root / "tiny.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    train(TrainConfig(data=str(data), out=str(root / "run"), steps=2, batch_size=2, seq_len=16, dim=16, depth=1,
                      heads=2, eval_every=0, eval_batches=1, progress=False, plot=False, device="cpu"))
    return root / "run"


def _set(cfg: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        cfg = cfg[p]
    cfg[last] = value


def _rewrite_model_metadata(run, **meta):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = str(run / "model.safetensors")
    with safe_open(path, "pt") as f:
        old = f.metadata()
    save_file(load_file(path), path, metadata={**old, **meta})


def _nan_weight(run):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = str(run / "model.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    tensors["norm.weight"][0] = float("nan")
    save_file(tensors, path, metadata=meta)


# (command, config.json edits, extra damage, what stderr must name)
BAD_INPUTS = {
    "model_config_null": ("generate", {"model_config": None}, None, ["config.json", "model_config"]),
    "model_config_abc": ("generate", {"model_config": "abc"}, None, ["config.json", "model_config"]),
    "special_tokens_5": ("generate", {"tokenizer.special_tokens": 5}, None, ["config.json", "tokenizer.special_tokens"]),
    "tokenizer_not_a_folder": ("generate", {"tokenizer": {"type": "hf", "name": "no-such-tok-dir"}}, None,
                               ["config.json", "tokenizer.name"]),
    "train_config_list": ("resume", {"train_config": [1, 2]}, None, ["config.json", "train_config"]),
    "train_config_bad_steps": ("resume", {"train_config.steps": "many"}, None, ["config.json", "train_config.steps"]),
    "train_state_bad_step": ("resume", {"train_state.step": "x"}, None, ["config.json", "train_state.step"]),
    "files_outside": ("generate", {"files.model": "../elsewhere/x.safetensors"}, None, ["config.json", "files.model"]),
    "dim_huge": ("generate", {"model_config.dim": 131072}, None, ["config.json", "model_config.dim"]),
    "max_seq_len_huge": ("generate", {"model_config.max_seq_len": 10 ** 9}, None,
                         ["config.json", "model_config.max_seq_len"]),
    "aliases_garbage": ("generate", {}, lambda run: _rewrite_model_metadata(run, **{"bitnet.aliases": "%%%"}),
                        ["model.safetensors", "bitnet.aliases"]),
    "nan_weight": ("generate", {}, _nan_weight, ["model.safetensors", "norm.weight", "NaN"]),
    "journal_garbage": ("generate", {}, lambda run: (run / ".checkpoint-pending.json").write_text("[1"),
                        [".checkpoint-pending.json"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_garbage_run_folders_give_one_line_naming_file_and_field(base_run, tmp_path, case):
    import shutil

    command, edits, damage, names = BAD_INPUTS[case]
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(run / "model.safetensors", tmp_path / "elsewhere" / "x.safetensors")
    cfg = json.loads((run / "config.json").read_text())
    for key, value in edits.items():
        _set(cfg, key, value)
    (run / "config.json").write_text(json.dumps(cfg))
    if damage is not None:
        damage(run)
    if command == "generate":
        proc = run_cli("generate", run, "--prompt", "the", "--max-new-tokens", "3", "--device", "cpu")
    else:
        proc = run_cli("train", "--out", run, "--resume", "--no-progress", "--no-plot", "--device", "cpu")
    err = proc.stderr.strip()
    assert proc.returncode == 1, (proc.returncode, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"bitnet {'train' if command == 'resume' else 'generate'}: error: ")
    for name in names:
        assert name in err, (name, err)
    assert proc.stdout == ""                                  # nothing echoed before the error


def test_a_failed_train_leaves_no_folder(tmp_path, capsys):
    data = tmp_path / "tiny.txt"
    data.write_text("a few words. " * 20)
    common = ["--steps", "1", "--dim", "16", "--depth", "1", "--heads", "2", "--batch-size", "2", "--no-progress",
              "--no-plot", "--device", "cpu"]
    cases = {"missing_data": ["--data", str(tmp_path / "nope.txt"), "--seq-len", "16"],
             "heads_do_not_divide": ["--data", str(data), "--seq-len", "16", "--heads", "3"],
             "seq_len_longer_than_data": ["--data", str(data), "--seq-len", "4096"],
             "bad_lr": ["--data", str(data), "--seq-len", "16", "--lr", "-1"]}
    for name, flags in cases.items():
        out = tmp_path / name
        with pytest.raises(SystemExit) as exc:
            main(["train", "--out", str(out), *common, *flags])
        err = capsys.readouterr().err
        assert exc.value.code == 1 and "error:" in err, (name, err)
        assert not out.exists(), name


def test_generate_checks_sampling_flags_before_echoing_the_prompt(base_run, capsys):
    for flags, what in ((["--top-p", "2"], "top_p"), (["--temperature", "-1"], "temperature"),
                        (["--top-k", "0"], "top_k"), (["--repetition-penalty", "0"], "repetition_penalty"),
                        (["--seed", str(2 ** 64)], "seed"), (["--max-new-tokens", "-1"], "max-new-tokens")):
        with pytest.raises(SystemExit) as exc:
            main(["generate", str(base_run), "--prompt", "HELLO-PROMPT", "--device", "cpu", *flags])
        out = capsys.readouterr()
        assert exc.value.code == 1 and what in out.err, (flags, out.err)
        assert out.out == "", flags                           # the prompt was not echoed
