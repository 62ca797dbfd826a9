"""The checkpoint journal: a save of a run folder as one atomic unit (staged files, the journal
``.checkpoint-pending.json`` as the commit point, renames), completing an interrupted save, and the
temporary files of killed saves. See :mod:`bitnet.io` for the protocol."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch
from torch import nn

from ..io_checks import CheckpointError, plain_name
from .atomic import _fsync_dir, _stage, _unlink, atomic_write_text
from .layout import (CHECKPOINT_ID_KEY, CONFIG_FILE, FORMAT, FORMAT_VERSION, MODEL_FILE, OPTIMIZER_FILE,
                     PENDING_FILE, RUN_FILES)
from .optimizer import _optimizer_payload
from .safetensors_files import _safetensors_writer, read_safetensors_header
from .state import _model_payload, model_config


def remove_stale_temps(run_dir) -> list[Path]:
    """Delete the temporary files that killed saves left in ``run_dir`` (``.<name>.*.tmp`` for the names
    of :data:`RUN_FILES`), except those a pending save still needs. Returns the deleted paths.

    Call it only while no other process writes to ``run_dir`` (``bitnet train`` does, at start)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    keep: set = set()
    if (run_dir / PENDING_FILE).is_file():
        try:
            keep = set(json.loads((run_dir / PENDING_FILE).read_text(encoding="utf-8"))["renames"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    removed = []
    for tmp in run_dir.iterdir():
        name = tmp.name
        if name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in RUN_FILES) and name not in keep \
                and tmp.is_file():
            _unlink(tmp)
            removed.append(tmp)
    return removed



def save_checkpoint(
    run_dir,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    train_state: dict | None = None,
    train_config: dict | None = None,
    tokenizer=None,
    rng_states: dict[str, torch.Tensor] | None = None,
    compact: bool = False,
) -> Path:
    """Write ``model.safetensors``, optionally ``optimizer.safetensors``, and ``config.json`` into ``run_dir``
    as one atomic unit: after a crash at any moment the folder holds the previous set or this one (the
    latter completed by :func:`recover_checkpoint`), never a mix. See the module docstring.

    ``compact`` stores a packed model's weights in base 3 (see :func:`save_model`). Returns the run folder.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(run_dir)                           # an earlier interrupted save goes first
    save_id = uuid.uuid4().hex
    files = {"model": MODEL_FILE}
    payloads = []
    if optimizer is not None:
        tensors, meta = _optimizer_payload(optimizer, rng_states)
        payloads.append((OPTIMIZER_FILE, tensors, {**meta, CHECKPOINT_ID_KEY: save_id}))
        files["optimizer"] = OPTIMIZER_FILE
    payloads.append((MODEL_FILE, *_model_payload(model, {CHECKPOINT_ID_KEY: save_id}, compact)))
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": type(model).__name__,
        "model_config": model_config(model),
        "tokenizer": tokenizer.to_config() if tokenizer is not None else {"type": "bytes", "special_tokens": []},
        "train_state": train_state or {},
        "train_config": train_config or {},
        "files": files,
        "checkpoint": {"id": save_id, "step": (train_state or {}).get("step")},
    }
    config = json.loads(json.dumps(config, default=str))  # exactly what config.json will hold
    staged: dict[str, Path] = {}
    try:
        for name, tensors, meta in payloads:
            staged[name] = _stage(run_dir / name, _safetensors_writer(tensors, meta))
        journal = {"id": save_id, "renames": {name: tmp.name for name, tmp in staged.items()}, "config": config}
        atomic_write_text(run_dir / PENDING_FILE, json.dumps(journal) + "\n")      # the commit point
    except BaseException:
        for tmp in staged.values():
            _unlink(tmp)
        raise
    recover_checkpoint(run_dir)                           # rename the new files into place
    return run_dir


def recover_checkpoint(run_dir) -> bool:
    """Complete a save of ``run_dir`` interrupted after its commit point (the journal
    ``.checkpoint-pending.json`` exists): rename its files into place, write its config.json, remove the
    journal. Idempotent (a crash inside is completed by the next call); True when there was a save to
    complete. Raises :class:`CheckpointError` when the journal is unreadable or a file it needs is gone."""
    run_dir = Path(run_dir)
    pending = run_dir / PENDING_FILE
    if not pending.is_file():
        return False
    try:
        journal = json.loads(pending.read_text(encoding="utf-8"))
        save_id, renames, config = journal["id"], journal["renames"], journal["config"]
        if not (isinstance(save_id, str) and isinstance(renames, dict) and isinstance(config, dict)):
            raise TypeError("id, renames or config has the wrong type")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{pending}: unreadable journal of an interrupted save ({e}); delete it to keep "
                              f"the previous checkpoint of {run_dir}") from e
    for name, tmp in renames.items():
        if name not in (MODEL_FILE, OPTIMIZER_FILE) or not isinstance(tmp, str) or not plain_name(tmp):
            raise CheckpointError(f"{pending}: the journal names an unexpected file {name!r} -> {tmp!r}")
        src, dst = run_dir / tmp, run_dir / name
        if src.is_file():
            os.replace(src, dst)
        elif file_checkpoint_id(dst) != save_id:
            raise CheckpointError(f"{run_dir}: an interrupted save cannot be completed: {tmp} is gone and {name} "
                                  f"is not from that save; delete {PENDING_FILE} to keep the previous checkpoint")
    _fsync_dir(run_dir)
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    os.unlink(pending)
    _fsync_dir(run_dir)
    return True


def file_checkpoint_id(path) -> str | None:
    """The save id in a safetensors file's metadata (None when it has none or is not safetensors)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    return read_safetensors_header(path)[1].get(CHECKPOINT_ID_KEY)
