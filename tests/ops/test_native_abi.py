"""The C ABI as Python sees it: one signature table for every exported function, struct layouts checked
against the library's own table at load (a wrong ctypes declaration makes the library unavailable, with
the reason)."""

from __future__ import annotations

import ctypes
import importlib.util
import re
from pathlib import Path

import pytest

from bitnet.ops import cpu as native

HEADER = Path(__file__).resolve().parents[2] / "csrc" / "bitnet_native.h"
HEADERS = (HEADER, HEADER.with_name("tq1_native.h"))   # every header of the C ABI

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native library not loaded: {native.LOAD_ERROR}")


def test_signature_table_declares_every_exported_function():
    exported = {name for h in HEADERS for name in re.findall(r"BITNET_API[^;(]*?\b(bitnet_\w+)\s*\(", h.read_text())}
    assert exported, "no BITNET_API functions found in the header"
    assert exported == set(native.SIGNATURES)


def test_abi_version_matches_the_header():
    version = int(re.search(r"#define BITNET_ABI_VERSION (\d+)", HEADER.read_text()).group(1))
    assert native._lib.bitnet_abi_version() == version == native._ABI_VERSION


def test_struct_layouts_match_the_library():
    native.check_struct_layouts(native._lib, native.STRUCTS)     # what the loader ran
    names = []
    while (n := native._lib.bitnet_struct_name(len(names))) is not None:
        names.append(n.decode())
    assert sorted(names) == sorted(native.STRUCTS)
    assert native._lib.bitnet_struct_size(len(names)) == -1
    off = ctypes.c_int64()
    assert native._lib.bitnet_struct_field(0, 10**6, ctypes.byref(off)) is None


def _fields(cls):
    return list(cls._fields_)


def _struct(name, fields):
    return type(name, (ctypes.Structure,), {"_fields_": fields})


def test_struct_check_names_the_first_difference():
    lib = native._lib
    fields = _fields(native._Block)
    i = [f[0] for f in fields].index("act_eps")
    wider = fields[:i] + [("act_eps", ctypes.c_double)] + fields[i + 1:]    # float -> double: offsets shift
    with pytest.raises(RuntimeError, match=r"struct bitnet_block field 'act_eps' is at byte 52 in C but at byte 56 in ctypes WrongBlock"):
        native.check_struct_layouts(lib, {**native.STRUCTS, "bitnet_block": _struct("WrongBlock", wider)})
    swapped = fields[:1] + [fields[2], fields[1]] + fields[3:]
    with pytest.raises(RuntimeError, match="struct bitnet_block has fields"):
        native.check_struct_layouts(lib, {**native.STRUCTS, "bitnet_block": _struct("SwappedBlock", swapped)})
    ls = _fields(native._LinearSet)
    short = ls[:-1] + [("bias", ctypes.c_void_p * 2)]                     # same offsets, 8 bytes short
    size = ctypes.sizeof(native._LinearSet)
    with pytest.raises(RuntimeError, match=f"struct bitnet_linear_set is {size} bytes in C but ctypes ShortSet is {size - 8} "):
        native.check_struct_layouts(lib, {**native.STRUCTS, "bitnet_linear_set": _struct("ShortSet", short)})
    with pytest.raises(RuntimeError, match="struct bitnet_block of the native library has no ctypes declaration"):
        native.check_struct_layouts(lib, {"bitnet_linear_set": native._LinearSet})
    with pytest.raises(RuntimeError, match="does not describe struct bitnet_extra"):
        native.check_struct_layouts(lib, {**native.STRUCTS, "bitnet_extra": native._Block})


def test_a_wrong_struct_declaration_keeps_the_library_unloaded():
    # A fresh copy of bitnet.ops.cpu whose ctypes block struct is wrong: the loader refuses the library
    # and says why (bitnet.ops then falls back to the reference backend instead of passing bad pointers).
    spec = importlib.util.spec_from_file_location("bitnet.ops._cpu_wrong_struct", native.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.available()
    fields = _fields(mod._Block)
    mod.STRUCTS = {**mod.STRUCTS, "bitnet_block": _struct("WrongBlock", fields[:-1] + [("table_len", ctypes.c_int32)] * 2)}
    mod._lib = None
    with pytest.warns(RuntimeWarning, match="bitnet: native CPU kernels not used: .*struct bitnet_block has fields"):
        mod._load()                 # a refused library is said aloud: everything would run the slow path
    assert not mod.available() and mod.LIB_PATH_REFUSED == native.LIB_PATH
    assert "struct bitnet_block has fields" in mod.LOAD_ERROR and "rebuild" in mod.LOAD_ERROR
