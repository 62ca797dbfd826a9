"""config.json of a run folder: read (once, after completing an interrupted save), type-checked field by
field, its tokenizer built, and its save id compared with the files it names (torn checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path

from ..io_checks import CheckpointError, first_line, inside, short_repr
from .journal import file_checkpoint_id, recover_checkpoint
from .layout import CONFIG_FILE


_OBJECT_FIELDS = ("model_config", "train_state", "train_config", "files", "checkpoint")


def read_json_object(path) -> dict:
    """The JSON object in ``path``; CheckpointError naming the file when it is unreadable, not JSON, or
    not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:          # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"corrupt JSON in {path}: {first_line(e)}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def config_file_of(path) -> Path:
    """The config.json that belongs to ``path``: inside a folder, beside a checkpoint file, or ``path``
    itself when it names a ``.json`` file."""
    path = Path(path)
    return path / CONFIG_FILE if path.is_dir() else (path if path.suffix == ".json" else path.parent / CONFIG_FILE)


def read_config(path) -> dict:
    """The config.json of a run folder (or beside a checkpoint file); FileNotFoundError if none.

    An interrupted save of the folder is completed first (:func:`recover_checkpoint`). The fields this
    package reads are type-checked: errors name the file and the field. This is the one place that reads
    a run folder's config.json: a load reads it once and hands the dict on."""
    cfg = config_file_of(path)
    if cfg.name == CONFIG_FILE:
        recover_checkpoint(cfg.parent)
    if not cfg.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} found for {path}")
    return check_config(read_json_object(cfg), cfg)


def check_config(data: dict, cfg) -> dict:
    """Type-check the fields of a run folder's config.json (already read, as ``data``) that this package
    reads; returns ``data``. Errors name the file ``cfg`` and the field."""
    for field in _OBJECT_FIELDS:
        if field in data and not isinstance(data[field], dict):
            raise CheckpointError(f"{cfg}: {field} must be a JSON object, got {short_repr(data[field])}")
    if "tokenizer" in data and data["tokenizer"] is not None and not isinstance(data["tokenizer"], dict):
        raise CheckpointError(f"{cfg}: tokenizer must be a JSON object (or null: bytes), got {short_repr(data['tokenizer'])}")
    for role, name in (data.get("files") or {}).items():
        inside(Path(cfg).parent, name, cfg, f"files.{role}")
    ckpt = data.get("checkpoint")
    if ckpt is not None and not (isinstance(ckpt.get("id"), str) and ckpt["id"]):
        raise CheckpointError(f"{cfg}: checkpoint.id must be a non-empty string, got {short_repr(ckpt.get('id'))}")
    return data


def read_tokenizer(path):
    """The tokenizer stored in the config.json of a run folder (or beside a checkpoint file), built by
    :func:`bitnet.tokenizer.tokenizer_from_config`; errors name the file and the field."""
    from ..tokenizer import tokenizer_from_config

    return tokenizer_from_config(read_config(path).get("tokenizer"), source=config_file_of(path))


def model_config_in(data: dict, source) -> dict:
    """The model config held by ``data`` (a config.json's ``model_config``, or ``data`` itself when it is a
    bare model config); CheckpointError naming ``source`` when it is no JSON object."""
    cfg = data.get("model_config", data)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source}: model_config must be a JSON object, got {short_repr(cfg)}")
    return dict(cfg)


def _config_from(config) -> tuple[dict, str]:
    """(model config, where it came from) of a ``config=`` argument: a dict or a JSON file."""
    if isinstance(config, dict):
        return model_config_in(config, "the config argument"), "the config argument"
    source = str(config_file_of(config))
    return model_config_in(read_config(config), source), source


def verify_checkpoint(run_dir, config: dict | None = None, roles=("model",)) -> None:
    """Refuse a torn checkpoint: each file of ``roles`` (keys of config.json's ``files``) must carry the
    save id that config.json's ``checkpoint.id`` names. Folders written before save ids are not checked."""
    run_dir = Path(run_dir)
    config = read_config(run_dir) if config is None else config
    ckpt = config.get("checkpoint")
    if ckpt is None:
        return
    cfg_file = run_dir / CONFIG_FILE
    files = config.get("files") or {}
    for role in roles:
        if role not in files:
            raise CheckpointError(f"{cfg_file}: files.{role} is missing: this checkpoint has no {role} file")
        path = inside(run_dir, files[role], cfg_file, f"files.{role}")
        if not path.is_file():
            raise CheckpointError(f"{run_dir}: {files[role]} (files.{role} of {CONFIG_FILE}) is missing")
        got = file_checkpoint_id(path)
        if got != ckpt["id"]:
            raise CheckpointError(
                f"{run_dir} holds a torn checkpoint: {files[role]} is from another save than {CONFIG_FILE} "
                f"(checkpoint id {got or 'none'}, {CONFIG_FILE} names {ckpt['id']}); resume from another copy "
                "of the run or start a new one")
