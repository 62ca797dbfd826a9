"""Checkpoints under kills: a process killed at any file boundary of a save leaves a folder that resumes
from one consistent step (the previous save or the new one) and ends with the weights of an uninterrupted
run; torn sets (files of two saves) are refused; temporary files of killed saves are removed; log.csv keeps
one row per step.

The kills are real: a forked child trains and ``os._exit``-s (no cleanup, no finally blocks, like SIGKILL)
right at the k-th boundary of the checkpoint files (each rename of model / optimizer / config / journal,
and the removal of the journal)."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bitnet.io import CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, PENDING_FILE, CheckpointError, load_model, read_config
from bitnet.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kills are forked children (POSIX)")

TINY = dict(steps=6, batch_size=2, seq_len=16, dim=16, depth=1, heads=2, eval_every=0, eval_batches=1,
            log_every=1, save_every=2, progress=False, plot=False, device="cpu", lr=3e-3, threads=1)
CHECKPOINT_FILES = {MODEL_FILE, OPTIMIZER_FILE, CONFIG_FILE, PENDING_FILE}
DIED = 77
BOUNDARIES = 6   # save at step 4: before the renames of journal, optimizer, model, config; after the journal is
#                  removed; then before the journal of the save at step 6 (its files already staged)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    data = root / "tiny.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    train(TrainConfig(data=str(data), out=str(root / "straight"), **TINY))
    train(TrainConfig(data=str(data), out=str(root / "at2"), stop_at=2, **TINY))
    return root, data


def train_and_die(run: Path, data: Path, boundary: int) -> int:
    """Resume ``run`` in a forked child that dies at checkpoint-file boundary ``boundary``; its exit code."""
    pid = os.fork()
    if pid == 0:                                             # the child: never returns
        code = 1
        try:
            real_replace, real_unlink, seen = os.replace, os.unlink, [0]

            def gate():
                if seen[0] == boundary:
                    os._exit(DIED)
                seen[0] += 1

            def replace(src, dst, *a, **kw):
                if Path(dst).name in CHECKPOINT_FILES:
                    gate()
                return real_replace(src, dst, *a, **kw)

            def unlink(path, *a, **kw):
                real_unlink(path, *a, **kw)
                if Path(path).name == PENDING_FILE:
                    gate()

            os.replace, os.unlink = replace, unlink
            train(TrainConfig(data=str(data), out=str(run), resume=True, **TINY))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def log_steps(run: Path) -> list[int]:
    return [int(r["step"]) for r in csv.DictReader(open(run / "log.csv"))]


@pytest.mark.parametrize("boundary", range(BOUNDARIES))
def test_a_kill_at_any_file_boundary_resumes_from_one_consistent_step(runs, tmp_path, boundary):
    root, data = runs
    run = tmp_path / "run"
    shutil.copytree(root / "at2", run)
    assert train_and_die(run, data, boundary) == DIED
    # whatever was on disk, readers see one consistent save: the previous one (step 2) or the new one (4)
    expected_step = 2 if boundary == 0 else 4
    assert read_config(run)["train_state"]["step"] == expected_step
    assert not (run / PENDING_FILE).exists()
    load_model(run)                                          # model file and config.json agree
    train(TrainConfig(data=str(data), out=str(run), resume=True, **TINY))
    straight = load_file(root / "straight" / MODEL_FILE)
    for name, t in load_file(run / MODEL_FILE).items():
        torch.testing.assert_close(t, straight[name], rtol=0, atol=0, msg=name)
    assert log_steps(run) == list(range(7))                  # one row per step, none repeated
    wanted = [(r["step"], r["lr"], r["train_loss"]) for r in csv.DictReader(open(root / "straight" / "log.csv"))]
    assert [(r["step"], r["lr"], r["train_loss"]) for r in csv.DictReader(open(run / "log.csv"))] == wanted
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []   # no temporary files left


def test_temporary_files_of_killed_saves_are_removed_on_start(runs, tmp_path):
    root, data = runs
    run = tmp_path / "run"
    shutil.copytree(root / "at2", run)
    assert train_and_die(run, data, 0) == DIED               # killed with the step-4 files staged
    leftovers = sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))
    assert len(leftovers) == 3 and all(p.startswith(".") for p in leftovers)    # model, optimizer, journal
    (run / "notes.tmp").write_text("not ours")               # files that are not ours are left alone
    train(TrainConfig(data=str(data), out=str(run), resume=True, **{**TINY, "steps": 6}))
    assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == ["notes.tmp"]


def test_a_torn_set_is_refused_with_the_folder_and_the_file(runs, tmp_path):
    root, data = runs
    run = tmp_path / "run"
    shutil.copytree(root / "at2", run)
    old_model = (run / MODEL_FILE).read_bytes()
    train(TrainConfig(data=str(data), out=str(run), resume=True, **{**TINY, "stop_at": 4}))
    (run / MODEL_FILE).write_bytes(old_model)                # model of step 2 beside config/optimizer of step 4
    with pytest.raises(CheckpointError, match=rf"{run}.*torn.*{MODEL_FILE}"):
        load_model(run)
    with pytest.raises(CheckpointError, match=rf"torn.*{MODEL_FILE}"):
        train(TrainConfig(data=str(data), out=str(run), resume=True, **TINY))

    shutil.rmtree(run)
    shutil.copytree(root / "at2", run)
    old_opt = (run / OPTIMIZER_FILE).read_bytes()
    train(TrainConfig(data=str(data), out=str(run), resume=True, **{**TINY, "stop_at": 4}))
    (run / OPTIMIZER_FILE).write_bytes(old_opt)
    load_model(run)                                          # the model alone is consistent with config.json
    with pytest.raises(CheckpointError, match=rf"torn.*{OPTIMIZER_FILE}"):
        train(TrainConfig(data=str(data), out=str(run), resume=True, **TINY))


def test_folders_written_before_save_ids_still_load_and_resume(runs, tmp_path):
    root, data = runs
    run = tmp_path / "run"
    shutil.copytree(root / "at2", run)
    cfg = json.loads((run / CONFIG_FILE).read_text())
    del cfg["checkpoint"]                                    # what the previous version wrote
    (run / CONFIG_FILE).write_text(json.dumps(cfg))
    load_model(run)
    assert train(TrainConfig(data=str(data), out=str(run), resume=True, **TINY))["steps"] == 6


def test_an_unreadable_journal_is_named(runs, tmp_path):
    root, _ = runs
    run = tmp_path / "run"
    shutil.copytree(root / "at2", run)
    (run / PENDING_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=PENDING_FILE):
        load_model(run)
