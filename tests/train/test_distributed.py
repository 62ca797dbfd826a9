"""``torchrun -m bitnet train`` with 2 CPU processes (gloo): DDP and FSDP runs, exact stop + resume."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from bitnet.io import load_model

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo needed")

TINY = ["--steps", "6", "--dim", "32", "--depth", "1", "--heads", "2", "--seq-len", "32", "--batch-size", "4",
        "--eval-every", "3", "--eval-batches", "2", "--no-progress", "--no-plot", "--device", "cpu"]


def torchrun(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "bitnet", "train", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


def finish(proc) -> dict:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out[out.index("{"):])          # only rank 0 prints its result


def test_ddp_and_fsdp_runs_resume_exactly(tmp_path):
    data = tmp_path / "tiny.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    # launched side by side: each python + torch start costs seconds on a busy CI box
    straight = torchrun("--data", data, "--out", tmp_path / "a", *TINY, cwd=tmp_path)
    part = torchrun("--data", data, "--out", tmp_path / "b", "--stop-at", "3", *TINY, cwd=tmp_path)
    a, b = finish(straight), finish(part)
    assert a["world_size"] == 2 and a["parallel"] == "ddp" and a["steps"] == 6
    assert torch.isfinite(torch.tensor(a["final_val_loss"])) and a["final_val_loss"] < a["initial_val_loss"]
    assert a["tokens_per_s"] > 0 and b["steps"] == 3 and b["parallel"] == "ddp"
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["train_state"]["step"] == 3 and saved["train_state"]["world_size"] == 2
    # the stopped DDP run resumes (here sharded with FSDP: checkpoints are full, unsharded ones either way)
    # and ends where the uninterrupted run ended
    rest = finish(torchrun("--out", tmp_path / "b", "--resume", "--fsdp", "--no-progress", cwd=tmp_path))
    assert rest["steps"] == 6 and rest["parallel"] == "fsdp"
    assert rest["final_val_loss"] == pytest.approx(a["final_val_loss"], abs=1e-5)
    ma, mb = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert ma.config == mb.config
    sa, sb = ma.state_dict(), mb.state_dict()
    for k in sa:                                      # gloo all-reduce order: equal up to float rounding
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6, msg=k)
    rows = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "3", "6"]


def test_fsdp_needs_several_processes(tmp_path):
    from bitnet.train import TrainConfig, train

    with pytest.raises(ValueError, match="torchrun"):
        train(TrainConfig(data="stdlib", out=str(tmp_path / "x"), fsdp=True, steps=1))
