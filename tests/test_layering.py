"""Layers only look down: every import inside ``src/bitnet`` (module level and inside functions) goes to
the same layer or a lower one (DESIGN.md "Layering")."""

from __future__ import annotations

import ast
from pathlib import Path

import bitnet

SRC = Path(bitnet.__file__).parent

LAYERS = (
    ("quant",),
    ("ops",),
    ("nn",),
    ("models", "runtime"),              # runtime: the CPU decode policy, it asks questions of nn and ops only
    ("storage",),                       # the packed form (pack) and its on-disk tensors, below checkpoints
    ("io", "io_checks", "tokenizer"),   # checkpoints; the tokenizer config is stored in config.json
    ("convert", "train"),
    ("generate", "hf", "loading"),      # loading: bitnet.load, which dispatches to hf and gguf import
    ("serve", "cli", "chat", "evaluate", "bench", "bench_cli", "lm_eval_adapter", "__main__", ""),
)
"""Bottom to top. A module's layer is that of its first component below ``bitnet`` ("" is the package
facade ``bitnet/__init__.py``), except that every ``cli`` module (``bitnet.train.cli``, ...) is a command
and sits in the top layer."""

EXCEPTIONS = {
    ("bitnet.generate.inference", "bitnet"):
        "BitNetInference(pack=True) looks bitnet.pack up on the package facade at call time, so that a "
        "build without pack gets a clear error (tests/generate/test_generate.py::test_pack_option_is_explicit "
        "swaps it there); a function-level import, and pack itself lives in bitnet.storage, far below",
}
"""(importer, imported) pairs that go up, each with the reason it is allowed."""

RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
TOP = len(LAYERS) - 1


def module_name(path: Path) -> str:
    parts = ["bitnet", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    if parts[-1] == "cli":
        return TOP
    first = parts[1] if len(parts) > 1 else ""
    if first not in RANK:
        raise AssertionError(f"{module} is in no layer of tests/test_layering.py::LAYERS; add it there")
    return RANK[first]


def is_module(name: str) -> bool:
    rel = SRC.joinpath(*name.split(".")[1:])
    return rel.with_suffix(".py").is_file() or (rel / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """Every bitnet module ``path`` imports, at module level or in a function (relative names resolved)."""
    module = module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "bitnet"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "bitnet":
                continue
            # from x import y: y may be a submodule (then that is what is imported) or a name in x
            found |= {f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base for a in node.names}
    return found


def upward_imports() -> list[str]:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        importer = module_name(path)
        for imported in sorted(imports_of(path)):
            if layer(imported) > layer(importer) and (importer, imported) not in EXCEPTIONS:
                bad.append(f"{importer} (layer {layer(importer)}) imports {imported} (layer {layer(imported)})")
    return bad


def test_layers_only_import_downwards():
    assert upward_imports() == []


def test_the_scanner_sees_function_level_and_relative_imports():
    # the scanner itself: relative imports resolved, function-level ones included
    tree = imports_of(SRC / "io" / "load.py")
    assert "bitnet.storage.pack" in tree and "bitnet.models" in tree      # models: imported inside a function
    assert layer("bitnet.convert.pack") > layer("bitnet.io.load") > layer("bitnet.storage.pack")
    assert layer("bitnet.train.cli") == TOP and layer("bitnet.train.trainer") < TOP


def test_exceptions_are_still_needed():
    # an exception whose import is gone must be removed from the list
    for importer, imported in EXCEPTIONS:
        path = SRC.joinpath(*importer.split(".")[1:]).with_suffix(".py")
        if not path.is_file():
            path = path.with_suffix("") / "__init__.py"
        assert imported in imports_of(path), f"{importer} no longer imports {imported}: drop the exception"


def test_io_and_storage_do_not_import_convert_at_run_time():
    import subprocess
    import sys

    code = ("import sys, bitnet.io, bitnet.storage; "
            "print(sorted(m for m in sys.modules if m.startswith(('bitnet.convert', 'bitnet.train', 'bitnet.hf'))))")
    # bitnet/__init__ imports everything; load io without it (a fresh package object for bitnet)
    code = ("import importlib.util, sys, types; spec = importlib.util.find_spec('bitnet'); "
            "pkg = types.ModuleType('bitnet'); pkg.__path__ = list(spec.submodule_search_locations); "
            "sys.modules['bitnet'] = pkg; " + code)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
