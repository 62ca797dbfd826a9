"""Register BitLlama with transformers' Auto classes lazily, without importing transformers.

``import bitnet`` calls :func:`install`. If transformers' auto modules are already imported, the
classes are registered at once. Otherwise a post-import hook watches the ``transformers`` modules:
once ``transformers.models.auto.configuration_auto`` (AutoConfig) or ``...modeling_auto``
(AutoModelForCausalLM) has been imported, the registration runs as soon as no transformers module is
half-way through its own import (registering earlier would import LlamaConfig inside transformers'
circular import chain). Nothing happens when transformers is not installed, and the hook removes
itself once both Auto classes know BitLlama.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODEL_AUTO = "transformers.models.auto.modeling_auto"


def _register_config(module) -> None:
    from .configuration_bitllama import BitLlamaConfig

    module.AutoConfig.register("bitllama", BitLlamaConfig, exist_ok=True)


def _register_model(module) -> None:
    from .bitllama import BitLlamaConfig, BitLlamaForCausalLM

    module.AutoModelForCausalLM.register(BitLlamaConfig, BitLlamaForCausalLM, exist_ok=True)


_CALLBACKS = {CONFIG_AUTO: _register_config, MODEL_AUTO: _register_model}
_pending: list[str] = []
_done: set[str] = set()
_running = False


def _importing_transformers(except_name: str) -> bool:
    """True while a transformers (or bitnet.hf) module other than ``except_name`` is still being imported."""
    for name, module in list(sys.modules.items()):
        if name != except_name and name.startswith(("transformers.", "bitnet.hf.")) or name == "transformers":
            if getattr(getattr(module, "__spec__", None), "_initializing", False):
                return True
    return False


def flush(just_loaded: str = "") -> None:
    """Run the pending registrations unless an import is still in progress (then a later import runs them)."""
    global _running
    if _running or not _pending or _importing_transformers(just_loaded):
        return
    _running = True
    try:
        while _pending:
            name = _pending.pop(0)
            _CALLBACKS[name](sys.modules[name])
            _done.add(name)
    finally:
        _running = False
    if _done == set(_CALLBACKS):
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]


class _Loader(importlib.abc.Loader):
    """Wraps the real loader of a transformers module; after executing it, runs pending registrations."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        name = module.__name__
        if name in _CALLBACKS and name not in _done and name not in _pending:
            _pending.append(name)
        flush(name)

    def __getattr__(self, name):                 # get_code, get_source, ... of the wrapped loader
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "transformers" and not name.startswith("transformers."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _Loader(spec.loader)
        return spec


_installed = False


def install() -> None:
    """Arrange the registration (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    if "transformers" not in sys.modules and importlib.util.find_spec("transformers") is None:
        return
    for name in (CONFIG_AUTO, MODEL_AUTO):
        if name in sys.modules:
            _pending.append(name)
    flush()
    if _done != set(_CALLBACKS):
        sys.meta_path.insert(0, _Finder())
