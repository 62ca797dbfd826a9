"""What resuming and interrupting a run need besides the checkpoint itself (see :mod:`bitnet.io`): the
train_state of config.json checked, log.csv cut back to the checkpoint's step, Ctrl-C turned into a stop
at the next step boundary (where a checkpoint is exact), and the RNG states saved and restored."""

from __future__ import annotations

import csv
import math
import signal
import sys
import threading
from pathlib import Path

import torch

from ..io import CheckpointError, atomic_write_text

LOG_FIELDS = ("step", "lr", "train_loss", "val_loss", "val_bpb", "tokens_per_s", "elapsed")
"""Columns of a run's log.csv."""


def check_train_state(state, cfg_file: Path) -> dict:
    """config.json's train_state, type-checked (errors name the file and the field)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{cfg_file}: train_state must be a JSON object, got {state!r}"[:300])

    def bad(field, allowed):
        raise CheckpointError(f"{cfg_file}: train_state.{field} must be {allowed}, got {state[field]!r}"[:300])

    if not isinstance(state.get("step"), int) or isinstance(state.get("step"), bool) or state["step"] < 0:
        raise CheckpointError(f"{cfg_file}: train_state.step must be an integer >= 0, got {state.get('step')!r}"[:300])
    if "tokens_seen" in state and (not isinstance(state["tokens_seen"], int) or isinstance(state["tokens_seen"], bool)
                                   or state["tokens_seen"] < 0):
        bad("tokens_seen", "an integer >= 0")
    for field in ("elapsed", "val_loss", "initial_val_loss"):
        v = state.get(field)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            bad(field, "a finite number" + (" or null" if field != "elapsed" else ""))
    return state


def truncate_log(path: Path, last_step: int) -> None:
    """Keep the rows of log.csv up to ``last_step`` (the checkpoint a run resumes from; -1: none), so that
    the rows a killed run wrote after its last checkpoint are not repeated by the resumed run."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    keep = [r for r in rows if (r.get("step") or "").isdigit() and int(r["step"]) <= last_step]
    if len(keep) == len(rows) and rows:
        return
    lines = [",".join(LOG_FIELDS)]
    lines += [",".join(r.get(k) or "" for k in LOG_FIELDS) for r in keep]
    atomic_write_text(path, "\n".join(lines) + "\n")


class StopRequest:
    """Ctrl-C (SIGINT) while training: the first one asks the loop to stop at the next step boundary
    (where a checkpoint is exact), a second one raises KeyboardInterrupt at once."""

    def __init__(self, say):
        self.requested = False
        self._say = say
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step, then saving a checkpoint (Ctrl-C again: stop at once, "
              "without one)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def rng_states(data_gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """The RNG states a resume needs: the data sampler's, torch's and (on CUDA) the device's."""
    states = {"data": data_gen.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng(states: dict[str, torch.Tensor], data_gen: torch.Generator, device: torch.device) -> None:
    """Put back what :func:`rng_states` saved."""
    data_gen.set_state(states["data"])
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
