"""Optimizer state as safetensors: tensors ``state.<i>.<name>`` and ``rng.<name>``, the rest as JSON
metadata (``bitnet.optimizer``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..io_checks import CheckpointError
from .layout import FORMAT
from .safetensors_files import _read_safetensors, save_safetensors


def _optimizer_payload(optimizer: torch.optim.Optimizer,
                       extra_tensors: dict[str, torch.Tensor] | None) -> tuple[dict, dict]:
    """(tensors, metadata) of :func:`save_optimizer`'s file."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    for name, value in (extra_tensors or {}).items():
        tensors[f"rng.{name}"] = value
    meta = {"format": FORMAT, "bitnet.optimizer": json.dumps(
        {"type": type(optimizer).__name__, "param_groups": sd["param_groups"], "scalars": scalars})}
    return tensors, meta


def save_optimizer(optimizer: torch.optim.Optimizer, path,
                   extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Optimizer state as safetensors: tensors ``state.<i>.<name>``, the rest as JSON metadata."""
    tensors, meta = _optimizer_payload(optimizer, extra_tensors)
    return save_safetensors(tensors, path, meta)


def load_optimizer(optimizer: torch.optim.Optimizer, path, device=None) -> dict[str, torch.Tensor]:
    """Restore ``optimizer`` from :func:`save_optimizer`'s file; returns the extra (``rng.*``) tensors."""
    tensors, meta = _read_safetensors(path, device="cpu")
    if "bitnet.optimizer" not in meta:
        raise CheckpointError(f"{path} is not a bitnet optimizer file (no 'bitnet.optimizer' metadata)")
    try:
        info = json.loads(meta["bitnet.optimizer"])
        kind, groups, scalars = info["type"], info["param_groups"], info["scalars"]
        if not (isinstance(kind, str) and isinstance(groups, list) and all(isinstance(g, dict) for g in groups)
                and isinstance(scalars, dict) and all(isinstance(v, dict) for v in scalars.values())):
            raise TypeError("type, param_groups or scalars has the wrong type")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: metadata 'bitnet.optimizer' is not a valid optimizer description ({e})") from e
    if kind != type(optimizer).__name__:
        raise CheckpointError(f"{path} holds {kind} state, cannot load into {type(optimizer).__name__}")
    state: dict[int, dict[str, Any]] = {}
    extras = {}
    try:
        for key, value in tensors.items():
            if key.startswith("rng."):
                extras[key[4:]] = value
                continue
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
        for idx, values in scalars.items():
            state.setdefault(int(idx), {}).update(values)
    except ValueError as e:
        raise CheckpointError(f"{path}: tensor names must be 'state.<index>.<name>' or 'rng.<name>' ({e})") from e
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"optimizer state in {path} does not fit this model: {e}") from e
    return extras
