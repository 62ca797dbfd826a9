"""The names of a bitnet run folder's files and of the metadata keys that tie them together (see
:mod:`bitnet.io` for the layout)."""

FORMAT = "bitnet"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
PENDING_FILE = ".checkpoint-pending.json"
"""The journal of a save in progress (see the module docstring); completed by :func:`recover_checkpoint`."""
CHECKPOINT_ID_KEY = "bitnet.checkpoint_id"
"""safetensors metadata key: the id of the save a file belongs to (config.json's ``checkpoint.id``)."""
RUN_FILES = (MODEL_FILE, OPTIMIZER_FILE, CONFIG_FILE, PENDING_FILE, "log.csv", "loss.png")
"""Files of a run folder whose temporary files (``.<name>.*.tmp``) :func:`remove_stale_temps` deletes."""
STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
