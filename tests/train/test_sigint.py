"""Ctrl-C during ``bitnet train`` (a real process, a real SIGINT): the run stops at a step boundary with a
checkpoint, exits 130, and ``--resume`` reproduces the loss curve and the weights of an uninterrupted run
exactly (the checkpoint used to hold the RNG state after the interrupted step had drawn its batch)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from bitnet.cli import main
from bitnet.train import TrainConfig, train

STEPS, UNTIL = 3000, 300      # a long schedule, interrupted early; both runs are compared up to step UNTIL
FLAGS = dict(steps=STEPS, batch_size=2, seq_len=16, dim=16, depth=1, heads=2, eval_every=0, eval_batches=1,
             log_every=1, lr=3e-3, device="cpu", threads=1)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGINT to a child process")


def cli_flags() -> list[str]:
    out = []
    for k, v in FLAGS.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out + ["--no-progress", "--no-plot"]


def rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_ctrl_c_then_resume_equals_the_uninterrupted_run(tmp_path, capsys):
    data = tmp_path / "tiny.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "bitnet", "train", "--data", str(data), "--out", str(run),
                             *cli_flags()], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = run / "log.csv"
    deadline = time.time() + 200
    while proc.poll() is None and time.time() < deadline:   # wait for a few training steps, then Ctrl-C
        if log.is_file() and len(log.read_text().splitlines()) >= 4:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    step = json.loads((run / "config.json").read_text())["train_state"]["step"]
    assert 2 <= step < UNTIL, f"interrupted at step {step}: the machine was too slow for this test's window"
    assert [int(r["step"]) for r in rows(log)] == list(range(step + 1))

    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--stop-at", str(UNTIL)]) == 0
    straight = tmp_path / "straight"
    train(TrainConfig(data=str(data), out=str(straight), stop_at=UNTIL, progress=False, plot=False, **FLAGS))
    want = [(r["step"], r["lr"], r["train_loss"]) for r in rows(straight / "log.csv")]
    got = [(r["step"], r["lr"], r["train_loss"]) for r in rows(log)]
    assert got == want                                       # the same loss at every step, no row twice
    ref = load_file(straight / "model.safetensors")
    for name, t in load_file(run / "model.safetensors").items():
        torch.testing.assert_close(t, ref[name], rtol=0, atol=0, msg=name)
