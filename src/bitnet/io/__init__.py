"""Checkpoints: safetensors + JSON, atomic saves, and loading from run folders or plain state dicts.

Run-folder layout (what :func:`save_checkpoint` writes and :func:`load_model` reads)::

    run/
      model.safetensors      model tensors; metadata "bitnet.config" repeats the model config (JSON),
                             "bitnet.aliases" lists tied tensors that were left out and
                             "bitnet.checkpoint_id" names the save the file belongs to
      config.json            {"format": "bitnet", "format_version": 1, "model_type": "BitNetTransformer",
                              "model_config": {...}, "tokenizer": {...}, "train_state": {"step": ...},
                              "train_config": {...}, "files": {...}, "checkpoint": {"id": ..., "step": ...}}
      optimizer.safetensors  (training only) optimizer tensors "state.<param>.<name>", RNG states
                             "rng.<name>"; metadata "bitnet.optimizer" holds param_groups and scalars,
                             "bitnet.checkpoint_id" the save it belongs to

**A save is one atomic unit.** :func:`save_checkpoint` writes every file of the new set to a temporary
file beside it (fsynced), then the *journal* ``.checkpoint-pending.json`` (itself atomically: temporary
file + rename) that names the temporary files and holds the new config.json: that is the commit point.
Only then are the files renamed over the old ones, config.json last, and the journal removed. A crash
before the commit point leaves the previous set untouched (plus temporary files, which
:func:`remove_stale_temps` deletes); a crash after it is completed by :func:`recover_checkpoint`, which
every reader of a run folder runs first (:func:`read_config`, :func:`load_model`, ``bitnet train
--resume``). Each file carries the id of its save and config.json names it, so a set whose files come
from different saves (an interrupted save of an older version, a file copied in by hand) is refused
with an error naming the folder and the file. Folders written before save ids existed load as before.

No pickle anywhere: ``.pth``/``.pt`` state dicts are read with ``torch.load(weights_only=True)``.
Untrusted files are checked before use: files named by a config (``files.model``) must lie inside its
folder; a model config is type-checked and compared with the tensor shapes of the file (read from the
safetensors header) before any model is built; float tensors must be finite and packed 2-bit codes in
{0, 1, 2}. Every such error is one line naming the file and the field or tensor (the checks live in
:mod:`bitnet.io_checks`).

Tied weights (``tie_embeddings=True``: ``head.weight`` *is* ``embed.weight``) cannot be stored twice
in safetensors; the duplicate is dropped at save time and re-tied at load time.

The package, one job per module (every name is importable from ``bitnet.io`` itself):

* :mod:`.layout` the file names and metadata keys above; :mod:`.device` ``resolve_device``;
* :mod:`.atomic` atomic writes; :mod:`.safetensors_files` tensor files read and written;
* :mod:`.state` a model's tensors (ties, compact payload, shape checks, config inferred from shapes);
* :mod:`.optimizer` optimizer state; :mod:`.journal` the save protocol and its recovery;
* :mod:`.config` config.json read, checked and verified against its files; :mod:`.load` ``load_model``.

Layering: ``io`` sits above ``storage`` (the packed form and its on-disk tensors) and ``models``, and
below ``convert`` / ``train``; it never imports them.
"""


from ..io_checks import (LAYER_RE, MAX_SEQ_LEN, CheckpointError, check_fields_against_shapes,  # noqa: F401
                         check_model_config, check_tensor_values, first_line, inside, parse_aliases, plain_name,
                         positive_int, short_repr)
from .atomic import atomic_write, atomic_write_text
from .config import read_config, read_json_object, read_tokenizer, verify_checkpoint
from .device import resolve_device
from .journal import file_checkpoint_id, recover_checkpoint, remove_stale_temps, save_checkpoint
from .layout import (CHECKPOINT_ID_KEY, CONFIG_FILE, FORMAT, FORMAT_VERSION, MODEL_FILE, OPTIMIZER_FILE,
                     PENDING_FILE, RUN_FILES, STATE_DICT_SUFFIXES)
from .load import load_checkpoint, load_model, resolve_checkpoint
from .optimizer import load_optimizer, save_optimizer
from .safetensors_files import read_safetensors_header, read_state_dict, save_safetensors
from .state import (check_state_shapes, guess_heads, infer_config, load_state_into, materialize_tables,
                    model_config, save_model, split_tied)

__all__ = [
    "CHECKPOINT_ID_KEY", "CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "MODEL_FILE", "OPTIMIZER_FILE", "PENDING_FILE",
    "RUN_FILES", "STATE_DICT_SUFFIXES", "CheckpointError", "atomic_write", "atomic_write_text", "check_state_shapes",
    "file_checkpoint_id", "guess_heads", "infer_config", "load_checkpoint", "load_model", "load_optimizer",
    "load_state_into", "materialize_tables", "model_config", "read_config", "read_json_object",
    "read_safetensors_header", "read_state_dict", "read_tokenizer", "recover_checkpoint", "remove_stale_temps",
    "resolve_checkpoint", "resolve_device", "save_checkpoint", "save_model", "save_optimizer", "save_safetensors",
    "split_tied", "verify_checkpoint",
]
