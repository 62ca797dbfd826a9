"""Native CPU backend: the C ABI library built from ``csrc/`` (no PyTorch headers), loaded with ctypes.

Where the library is looked for, in order:

1. ``$BITNET_NATIVE_LIB`` (a path), if set;
2. the module spec of ``bitnet.ops._bitnet_native``: the file is named like an extension module so
   that importlib finds it in normal installs (next to this file) *and* in scikit-build-core's
   editable "redirect" installs (where it lives in site-packages, not in ``src/``). It is never
   imported as a module, only located;
3. this directory.

If the library is missing (the package was installed without a C++ compiler) or does not load,
:data:`LOAD_ERROR` says why and :func:`available` is False; ``bitnet.ops`` then uses the reference
backend on CPU and ``bitnet.ops.native_info()`` reports the reason.

ISA: the best one the CPU supports (AMX > AVX-512 VNNI > AVX-VNNI > AVX2 > NEON > scalar; "amx" runs
prefill-sized matmuls on the AMX-INT8 tile unit and everything else on AVX-512 VNNI) unless
``$BITNET_ISA`` names another (a lower one, to test it); every function also takes ``isa=``.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Optional

import torch

ISAS = ("scalar", "neon", "avx2", "avxvnni", "avx512vnni", "amx")
"""ISA names, in the order of the library's ISA ids."""

_LIB_BASENAME = "_bitnet_native"
_ABI_VERSION = 8
_ERRORS = {-1: "invalid argument (shape/stride)", -2: "ISA not supported by this CPU/build", -3: "out of memory"}

_lib: Optional[ctypes.CDLL] = None
LIB_PATH: Optional[str] = None
LOAD_ERROR: Optional[str] = None


def _candidates() -> list[Path]:
    env = os.environ.get("BITNET_NATIVE_LIB", "").strip()
    if env:
        return [Path(env)]
    out = []
    spec = importlib.util.find_spec(f"{__package__}.{_LIB_BASENAME}")
    if spec is not None and spec.origin:
        out.append(Path(spec.origin))
    here = Path(__file__).resolve().parent
    out += [here / (_LIB_BASENAME + s) for s in (".so", ".dylib", ".dll", ".pyd")]
    return out


_P, _I64, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float

SIGNATURES = {
    "bitnet_abi_version": ([], _I),
    "bitnet_isa_name": ([_I], ctypes.c_char_p),
    "bitnet_isa_compiled": ([_I], _I),
    "bitnet_isa_supported": ([_I], _I),
    "bitnet_best_isa": ([], _I),
    "bitnet_get_default_isa": ([], _I),
    "bitnet_set_default_isa": ([_I], _I),
    "bitnet_cpu_name": ([], ctypes.c_char_p),
    "bitnet_isa_peak_gmacs": ([_I], ctypes.c_double),
    "bitnet_set_num_threads": ([_I], None),
    "bitnet_get_num_threads": ([], _I),
    "bitnet_matmul_int": ([_P, _I64, _I64, _I64, _P, _I64, _I64, _P, _I64, _I], _I),
    "bitnet_linear": ([_P, _P, _I64, _I64, _I64, _P, _I64, _I64, _F, _P, _P, _I64, _I], _I),
    "bitnet_quantize_act": ([_P, _I64, _I64, _I64, _I, _F, _P, _I64, _P, _I], _I),
    "bitnet_bitlinear": ([_P, _I64, _I64, _I64, _I, _F, _P, _I64, _I64, _F, _P, _P, _I64, _I], _I),
    "bitnet_prefetch_async": ([_I, _P, _P], _I),
    "bitnet_block_forward": ([_P, _P, _I64, _I64, _P, _P, _P, _P, _I, _I64, _P, _I], _I),
    "bitnet_block_activation": ([_I], ctypes.c_char_p),
    "bitnet_set_fused_gate": ([_I], _I),
    "bitnet_attention_step": ([_P, _I64, _I64, _I64, _I64, _I64, _P, _P, _I64, _P, _P, _P, _P, _I, _I64, _P, _P], _I),
    "bitnet_kv_dtype_name": ([_I], ctypes.c_char_p),
    "bitnet_prefetch_wait": ([], None),
    "bitnet_bitlinear_multi": ([_P, _I64, _I64, _I64, _I, _F, _P, _F, _I, _P, _P, _I64, _P, _P, _P, _I64, _I], _I),
    "bitnet_int8_matmul_int": ([_P, _I64, _I64, _I64, _P, _I64, _I64, _P, _I64, _I], _I),
    "bitnet_int8_linear": ([_P, _I64, _I64, _I64, _I, _F, _P, _I64, _I64, _P, _P, _P, _I64, _I], _I),
    "bitnet_struct_name": ([_I], ctypes.c_char_p),
    "bitnet_struct_size": ([_I], _I64),
    "bitnet_struct_field": ([_I, _I, ctypes.POINTER(_I64)], ctypes.c_char_p),
    # the experimental TQ1 (1.6-bit) weights: csrc/tq1_native.h, used by bitnet.ops.tq1
    "bitnet_tq1_matmul_int": ([_P, _I64, _I64, _I64, _P, _I64, _I64, _P, _I64, _I], _I),
    "bitnet_tq1_bitlinear": ([_P, _I64, _I64, _I64, _I, _F, _P, _I64, _I64, _F, _P, _P, _I64, _I], _I),
    "bitnet_tq1_bitlinear_multi": ([_P, _I64, _I64, _I64, _I, _F, _P, _F, _I, _P, _P, _I64, _P, _P, _P, _I64, _I],
                                   _I),
    "bitnet_tq1_kernel_name": ([_I], ctypes.c_char_p),
}
"""The C ABI of ``csrc/bitnet_native.h`` and ``csrc/tq1_native.h`` as ctypes sees it, the one declaration
on the Python side: function name -> (argument types, result type). Every function is declared at load."""


def _declare(lib: ctypes.CDLL) -> None:
    for name, (args, res) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = res


class _LinearSet(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int32), ("format", ctypes.c_int32), ("in_features", ctypes.c_int64),
                ("ldw", ctypes.c_int64), ("w", ctypes.c_void_p * 3), ("rows", ctypes.c_int64 * 3),
                ("scale", ctypes.c_void_p * 3), ("bias", ctypes.c_void_p * 3)]


class _Block(ctypes.Structure):
    _fields_ = [("dim", ctypes.c_int64), ("hidden", ctypes.c_int64), ("heads", ctypes.c_int64),
                ("kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("bits", ctypes.c_int32),
                ("activation", ctypes.c_int32), ("gated", ctypes.c_int32), ("act_eps", ctypes.c_float),
                ("attn_norm", ctypes.c_void_p), ("attn_norm_eps", ctypes.c_float),
                ("sub_norm", ctypes.c_void_p), ("sub_norm_eps", ctypes.c_float),
                ("ffn_norm", ctypes.c_void_p), ("ffn_norm_eps", ctypes.c_float),
                ("post_norm", ctypes.c_void_p), ("post_norm_eps", ctypes.c_float),
                ("qkv", _LinearSet), ("o", _LinearSet), ("gate_up", _LinearSet), ("down", _LinearSet),
                ("cos_table", ctypes.c_void_p), ("sin_table", ctypes.c_void_p), ("table_len", ctypes.c_int64)]


STRUCTS = {"bitnet_linear_set": _LinearSet, "bitnet_block": _Block}
"""The structs passed across the C ABI: C name -> ctypes declaration, checked against the library's own
layout table (``bitnet_struct_*``) at load."""


def _c_struct_layout(lib: ctypes.CDLL, index: int) -> tuple[int, list[tuple[str, int]]]:
    """(sizeof, [(field, offset), ...]) of the library's struct number ``index``."""
    fields, off = [], ctypes.c_int64()
    while (name := lib.bitnet_struct_field(index, len(fields), ctypes.byref(off))) is not None:
        fields.append((name.decode(), off.value))
    return int(lib.bitnet_struct_size(index)), fields


def check_struct_layouts(lib: ctypes.CDLL, structs: dict) -> None:
    """Compare every struct the library describes with its ctypes declaration in ``structs`` (C name ->
    ctypes.Structure): same fields in the same order, same offsets, same size. RuntimeError naming the
    struct and the first difference otherwise."""
    c_names = []
    while (name := lib.bitnet_struct_name(len(c_names))) is not None:
        c_names.append(name.decode())
    missing = sorted(set(structs) - set(c_names))
    if missing:
        raise RuntimeError(f"the native library does not describe struct {', '.join(missing)}")
    for index, name in enumerate(c_names):
        cls = structs.get(name)
        if cls is None:
            raise RuntimeError(f"struct {name} of the native library has no ctypes declaration in bitnet.ops.cpu")
        size, c_fields = _c_struct_layout(lib, index)
        py_fields = [(f[0], getattr(cls, f[0]).offset) for f in cls._fields_]
        if [f for f, _ in c_fields] != [f for f, _ in py_fields]:
            raise RuntimeError(f"struct {name} has fields {[f for f, _ in c_fields]} in C but ctypes "
                               f"{cls.__name__} declares {[f for f, _ in py_fields]}")
        for (field, c_off), (_, py_off) in zip(c_fields, py_fields):
            if c_off != py_off:
                raise RuntimeError(f"struct {name} field {field!r} is at byte {c_off} in C but at byte {py_off} "
                                   f"in ctypes {cls.__name__}")
        if size != ctypes.sizeof(cls):
            raise RuntimeError(f"struct {name} is {size} bytes in C but ctypes {cls.__name__} is "
                               f"{ctypes.sizeof(cls)} bytes")


def _load() -> None:
    _find()
    if _lib is None and LIB_PATH_REFUSED:
        # a library was found but refused (a build of another version, say after an upgrade without a
        # rebuild): say so now, since everything would silently run on the slow pure-torch path
        warnings.warn(f"bitnet: native CPU kernels not used: {LOAD_ERROR}", RuntimeWarning, stacklevel=2)


LIB_PATH_REFUSED: Optional[str] = None
"""Path of a native library that was found but not used (see :data:`LOAD_ERROR`), else None."""


def _find() -> None:
    global _lib, LIB_PATH, LOAD_ERROR, LIB_PATH_REFUSED
    tried = []
    for path in _candidates():
        if not path.is_file():
            tried.append(str(path))
            continue
        LIB_PATH_REFUSED = str(path)             # until every check below has passed
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:  # present but unloadable (wrong arch, missing libstdc++, ...): report it
            LOAD_ERROR = f"{path} did not load: {e}"
            return
        # the version first: a library of another version may lack functions this module declares
        version = getattr(lib, "bitnet_abi_version", None)
        version = version() if version is not None else None
        if version != _ABI_VERSION:
            LOAD_ERROR = f"{path} has ABI version {version}, expected {_ABI_VERSION} (rebuild: pip install .)"
            return
        try:
            _declare(lib)
        except AttributeError as e:
            LOAD_ERROR = f"{path} lacks a function of ABI version {_ABI_VERSION} ({e}; rebuild: pip install .)"
            return
        try:
            check_struct_layouts(lib, STRUCTS)
        except RuntimeError as e:
            LOAD_ERROR = f"{path}: {e} (rebuild: pip install .)"
            return
        _lib, LIB_PATH, LIB_PATH_REFUSED = lib, str(path), None
        return
    LOAD_ERROR = (
        "native library not built (the package was installed without a C++ compiler?); looked for "
        + ", ".join(tried)
    )


_load()


def available() -> bool:
    """True if the native library is loaded."""
    return _lib is not None


def _need() -> ctypes.CDLL:
    if _lib is None:
        raise RuntimeError(f"the native CPU backend is not available: {LOAD_ERROR}")
    return _lib


def isa_id(isa: Optional[str]) -> int:
    """Library id of an ISA name; None -> -1 (the default ISA)."""
    if isa is None:
        return -1
    key = str(isa).strip().lower()
    if key not in ISAS:
        raise ValueError(f"isa must be one of {', '.join(ISAS)}, got {isa!r}")
    i = ISAS.index(key)
    lib = _need()
    if not lib.bitnet_isa_supported(i):
        why = "not compiled into this build" if not lib.bitnet_isa_compiled(i) else "not supported by this CPU"
        raise RuntimeError(f"isa {key!r} is {why}; supported here: {', '.join(supported_isas())}")
    return i


def supported_isas() -> list[str]:
    """ISAs compiled in and supported by this CPU, lowest first."""
    if _lib is None:
        return []
    return [n for i, n in enumerate(ISAS) if _lib.bitnet_isa_supported(i)]


def compiled_isas() -> list[str]:
    if _lib is None:
        return []
    return [n for i, n in enumerate(ISAS) if _lib.bitnet_isa_compiled(i)]


def default_isa() -> Optional[str]:
    return ISAS[_lib.bitnet_get_default_isa()] if _lib is not None else None


def set_default_isa(isa: Optional[str]) -> None:
    """Force the ISA used when none is given (None: back to the best one)."""
    _need().bitnet_set_default_isa(isa_id(isa))


def set_num_threads(n: int) -> None:
    """Threads of the native backend (n <= 0: number of cores)."""
    _need().bitnet_set_num_threads(int(n))


def get_num_threads() -> int:
    return int(_need().bitnet_get_num_threads())


def set_fused_gate(on: bool) -> bool:
    """Whether the native blocks run a gated feed-forward of more than 3 tokens fused (gate and up GEMMs
    and the activation tile by tile: the default) or as one gate|up GEMM followed by the activation.
    Both give the same bits (tests compare them); returns the previous setting."""
    return bool(_need().bitnet_set_fused_gate(1 if on else 0))


def cpu_name() -> str:
    return _lib.bitnet_cpu_name().decode(errors="replace") if _lib is not None else ""


def isa_peak_gmacs(isa: Optional[str] = None) -> float:
    """Int8 multiply-add peak of one core with ``isa``'s instruction (vpmaddubsw, vpdpbusd, tdpbusd),
    measured on registers only for ~20 ms, in GMAC/s (0.0 for the scalar kernel)."""
    return float(_need().bitnet_isa_peak_gmacs(isa_id(isa)))


def _check_rc(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"native {what} failed: {_ERRORS.get(rc, rc)}")


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """t (M, K) with unit stride along K and rows that do not overlap; returns (t, row stride)."""
    m, k = t.shape
    if t.stride(-1) != 1 or (m > 1 and t.stride(0) < k):
        t = t.contiguous()
    return t, (t.stride(0) if m > 1 else k)


# The functions below expect arguments already validated by bitnet.ops (dtype, shapes, device);
# they only make the layouts the library reads (unit stride along K, contiguous weight rows).

def matmul_int(x_q: torch.Tensor, w_packed: torch.Tensor, in_features: int, isa: Optional[str] = None) -> torch.Tensor:
    """int32 (M, N) = x_q (M, K) int8 @ W^T, W in I2 layout (N, Kp/4)."""
    lib = _need()
    x_q, ldx = _rows(x_q)
    if not w_packed.is_contiguous():
        w_packed = w_packed.contiguous()
    m, n = x_q.shape[0], w_packed.shape[0]
    out = torch.empty((m, n), dtype=torch.int32)
    rc = lib.bitnet_matmul_int(x_q.data_ptr(), m, in_features, ldx, w_packed.data_ptr(), n,
                               w_packed.shape[1], out.data_ptr(), n, isa_id(isa))
    _check_rc(rc, "matmul_int")
    return out


def linear(x_q: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: float, in_features: int,
           bias: Optional[torch.Tensor], isa: Optional[str] = None) -> torch.Tensor:
    """float32 (M, N) = (x_q @ W^T) * w_scale / x_scale (+ bias)."""
    lib = _need()
    x_q, ldx = _rows(x_q)
    if x_scale.dtype != torch.float32 or not x_scale.is_contiguous():
        x_scale = x_scale.to(torch.float32).contiguous()
    if not w_packed.is_contiguous():
        w_packed = w_packed.contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    m, n = x_q.shape[0], w_packed.shape[0]
    out = torch.empty((m, n), dtype=torch.float32)
    rc = lib.bitnet_linear(x_q.data_ptr(), x_scale.data_ptr(), m, in_features, ldx, w_packed.data_ptr(),
                           n, w_packed.shape[1], float(w_scale), _ptr(bias), out.data_ptr(), n, isa_id(isa))
    _check_rc(rc, "linear")
    return out


def quantize_act(x: torch.Tensor, bits: int = 8, eps: float = 1e-5, isa: Optional[str] = None):
    """Per-token absmax int8 quantisation, bit for bit as ``bitnet.quant.activation_quant_int8``.

    Returns (xq int8 (M, K), s float32 (M, 1)).
    """
    lib = _need()
    x, ldx = _rows(x if x.dtype == torch.float32 else x.float())
    m, k = x.shape
    xq = torch.empty((m, k), dtype=torch.int8)
    s = torch.empty((m, 1), dtype=torch.float32)
    rc = lib.bitnet_quantize_act(x.data_ptr(), m, k, ldx, int(bits), float(eps), xq.data_ptr(), k,
                                 s.data_ptr(), isa_id(isa))
    _check_rc(rc, "quantize_act")
    return xq, s


def bitlinear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: float, in_features: int,
              bias: Optional[torch.Tensor], bits: int = 8, eps: float = 1e-5, isa: Optional[str] = None) -> torch.Tensor:
    """Fused per-token int8 quantisation of x (M, K) + ternary linear: float32 (M, N)."""
    lib = _need()
    x, ldx = _rows(x if x.dtype == torch.float32 else x.float())
    if not w_packed.is_contiguous():
        w_packed = w_packed.contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    m, n = x.shape[0], w_packed.shape[0]
    out = torch.empty((m, n), dtype=torch.float32)
    rc = lib.bitnet_bitlinear(x.data_ptr(), m, in_features, ldx, int(bits), float(eps), w_packed.data_ptr(),
                              n, w_packed.shape[1], float(w_scale), _ptr(bias), out.data_ptr(), n, isa_id(isa))
    _check_rc(rc, "bitlinear")
    return out


def _kv_dtypes() -> tuple[torch.dtype, ...]:
    names = []
    while _lib is not None and (name := _lib.bitnet_kv_dtype_name(len(names))) is not None:
        names.append(name.decode())
    return tuple(getattr(torch, n) for n in names)


KV_DTYPES = _kv_dtypes()
"""Element types of the KV caches the native attention reads and writes, indexed by their code: read from
the library's own table (``bitnet_kv_dtype_name`` in csrc/attention.cpp): ``(torch.float32, torch.float16,
torch.int8)``. Float16 entries are rounded to nearest even when written (the bits of ``Tensor.half()``) and
widened exactly when read; int8 entries come with one float32 scale per (row, head, position), written as
:func:`bitnet.nn.attention.quantize_kv` does and read back as ``q * scale``; the attention math is float32.
Empty when the library is not loaded."""


def kv_dtype_code(k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
    """The library's code of the caches' element type (both alike, one of :data:`KV_DTYPES`)."""
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in KV_DTYPES:
        raise ValueError(f"k_cache and v_cache must both have one dtype of {[str(d) for d in KV_DTYPES]}, got "
                         f"{k_cache.dtype} and {v_cache.dtype}")
    return KV_DTYPES.index(k_cache.dtype)


def kv_scales_fit(k_cache: torch.Tensor, scale) -> bool:
    """Whether ``scale`` can be the scales of the int8 cache ``k_cache``: contiguous float32 (B, kv_heads, max_len)."""
    return (isinstance(scale, torch.Tensor) and scale.dtype == torch.float32 and scale.is_contiguous()
            and scale.shape == k_cache.shape[:3])


def _kv_scale_ptrs(k_cache: torch.Tensor, k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor]):
    """(k_scale, v_scale) pointers for the library: the int8 cache's scales (B, kv_heads, max_len) float32,
    None for a float cache (which must not be given any)."""
    if k_cache.dtype != torch.int8:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale/v_scale belong to an int8 cache; this one is {k_cache.dtype}")
        return None, None
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not kv_scales_fit(k_cache, t):
            got = None if t is None else f"{t.dtype} {tuple(t.shape)}"
            raise ValueError(f"{name} must be the int8 cache's contiguous float32 scales of shape "
                             f"{tuple(k_cache.shape[:3])}, got {got}")
    return k_scale.data_ptr(), v_scale.data_ptr()


def attention_step(qkv: torch.Tensor, batch: int, heads: int, kv_heads: int, head_dim: int, cos: torch.Tensor,
                   sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                   k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotary + KV-cache append + causal attention of one layer in one native call (float32 math).

    qkv (B*T, (heads + 2*kv_heads) * head_dim) contiguous float32: each token's q, k, v heads (q and k are
    rotated in place); cos/sin (L, head_dim) float32 rotary tables; k_cache/v_cache (B, kv_heads, max_len,
    head_dim) contiguous, float32, float16 or int8 (:data:`KV_DTYPES`: float16 entries are written rounded to
    nearest even, as ``Tensor.half()``; int8 ones need their scales k_scale/v_scale (B, kv_heads, max_len)
    float32, written as :func:`bitnet.nn.attention.quantize_kv`); positions int64 (B,): token t of row b sits
    at positions[b] + t and attends to cache positions 0..positions[b] + t. Returns out (B*T, heads * head_dim)
    float32.
    """
    lib = _need()
    for name, t in (("qkv", qkv), ("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 tensor, got {t.dtype}")
    code = kv_dtype_code(k_cache, v_cache)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not t.is_contiguous() or t.dim() != 4 or tuple(t.shape) != tuple(k_cache.shape):
            raise ValueError(f"{name} must be a contiguous (batch, kv_heads, max_len, head_dim) tensor like k_cache")
    if positions.dtype != torch.int64 or not positions.is_contiguous() or positions.numel() != batch:
        raise ValueError(f"positions must be a contiguous int64 tensor of {batch} start positions")
    rows = qkv.shape[0]
    if batch <= 0 or rows % batch or qkv.shape[1] != (heads + 2 * kv_heads) * head_dim:
        raise ValueError(f"qkv must have shape (batch * T, (heads + 2 * kv_heads) * head_dim), got {tuple(qkv.shape)}")
    if tuple(k_cache.shape[:2]) != (batch, kv_heads) or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache must have shape ({batch}, {kv_heads}, max_len, {head_dim}), got {tuple(k_cache.shape)}")
    ks, vs = _kv_scale_ptrs(k_cache, k_scale, v_scale)
    out = torch.empty((rows, heads * head_dim), dtype=torch.float32)
    rc = lib.bitnet_attention_step(qkv.data_ptr(), batch, rows // batch, heads, kv_heads, head_dim, cos.data_ptr(),
                                   sin.data_ptr(), cos.shape[0], k_cache.data_ptr(), v_cache.data_ptr(), ks, vs,
                                   code, k_cache.shape[2], positions.data_ptr(), out.data_ptr())
    _check_rc(rc, "attention_step (a position beyond the cache or rotary table?)")
    return out


class BitLinearGroup:
    """Packed ternary matrices that read the same input (q/k/v, gate/up), run by one native call.

    ``group(x, norm_weight=None, norm_eps=1e-6)`` quantises x (M, K) float32 once per token (after an
    RMSNorm with ``norm_weight`` (K,) when given, as :class:`bitnet.nn.RMSNorm` computes it) and returns
    float32 (M, sum N): matrix j's output in its own column range, concatenated in order (split with
    :meth:`split`). The pointer arrays are built once; the tensors are held, so they stay valid.

    Args:
        weights: I2 uint8 tensors (N_j, Kp/4) with equal row lengths.
        scales: 0-dim float32 tensors (the layers' ``w_scale`` buffers, read at every call).
        biases: float32 (N_j,) tensors or None.
        in_features: K. bits: activation bits (2..8). eps: activation-scale clamp.
    """

    format = 0
    """Weight layout code of the native block's linear sets (BITNET_WEIGHTS_I2; TQ1 groups: 1)."""

    def __init__(self, weights, scales, biases, in_features: int, bits: int = 8, eps: float = 1e-5,
                 isa: Optional[str] = None):
        if not weights or len(weights) != len(scales) or len(weights) != len(biases):
            raise ValueError("weights, scales and biases must be equally long, non-empty lists")
        ldw = weights[0].shape[1]
        for i, w in enumerate(weights):
            if w.dtype != torch.uint8 or w.dim() != 2 or w.shape[1] != ldw or not w.is_contiguous():
                raise ValueError(f"weights[{i}] must be a contiguous uint8 (N, {ldw}) tensor, got "
                                 f"{w.dtype} {tuple(w.shape)}")
        for i, s in enumerate(scales):
            if s.dtype != torch.float32 or s.numel() != 1:
                raise ValueError(f"scales[{i}] must be a one-element float32 tensor, got {s.dtype} {tuple(s.shape)}")
        biases = [None if b is None else b.to(torch.float32).contiguous() for b in biases]
        self._keep = (list(weights), list(scales), biases)
        n = len(weights)
        self.sizes = [int(w.shape[0]) for w in weights]
        self.total = sum(self.sizes)
        self.in_features, self.bits, self.eps, self.ldw = int(in_features), int(bits), float(eps), int(ldw)
        self._isa = isa_id(isa)
        self._w = (ctypes.c_void_p * n)(*[w.data_ptr() for w in weights])
        self._n = (ctypes.c_int64 * n)(*self.sizes)
        self._s = (ctypes.c_void_p * n)(*[s.data_ptr() for s in scales])
        self._b = (ctypes.c_void_p * n)(*[_ptr(b) for b in biases])
        self._ptrs = [t.data_ptr() for t in list(weights) + list(scales)]
        self._lens = (ctypes.c_int64 * n)(*[w.numel() for w in weights])

    def prefetch(self) -> None:
        """Start pulling this group's weights into cache on the native workers and return at once (the
        next native call stops it). Call it before Python work that precedes this group's call."""
        _need().bitnet_prefetch_async(len(self.sizes), self._w, self._lens)
        self._prefetching = True

    def __del__(self):
        # the weights this group holds may be freed next: a prefetch must not be reading them
        if getattr(self, "_prefetching", False) and _lib is not None:
            _lib.bitnet_prefetch_wait()

    def valid_for(self, weights, scales) -> bool:
        """Whether the group still points at these tensors' storage (a reload replaces them)."""
        return [t.data_ptr() for t in list(weights) + list(scales)] == self._ptrs

    def __call__(self, x: torch.Tensor, norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 1e-6) -> torch.Tensor:
        lib = _need()
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must be float32 (M, {self.in_features}), got {x.dtype} {tuple(x.shape)}")
        x, ldx = _rows(x)
        if norm_weight is not None and (norm_weight.dtype != torch.float32 or not norm_weight.is_contiguous()):
            norm_weight = norm_weight.to(torch.float32).contiguous()
        m = x.shape[0]
        out = torch.empty((m, self.total), dtype=torch.float32)
        rc = lib.bitnet_bitlinear_multi(x.data_ptr(), m, self.in_features, ldx, self.bits, self.eps,
                                        _ptr(norm_weight), float(norm_eps), len(self.sizes), self._w, self._n,
                                        self.ldw, self._s, self._b, out.data_ptr(), self.total, self._isa)
        _check_rc(rc, "bitlinear_multi")
        return out

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Views of each matrix's output in ``y`` (..., sum N)."""
        return torch.split(y, self.sizes, dim=-1)


def _block_activations() -> tuple[str, ...]:
    names = []
    while _lib is not None and (name := _lib.bitnet_block_activation(len(names))) is not None:
        names.append(name.decode())
    return tuple(names)


BLOCK_ACTIVATIONS = _block_activations()
"""Gate activations :class:`NativeBlock` computes, indexed by their code: read from the library's own
table (``bitnet_block_activation`` in csrc/block.cpp), so Python and C cannot disagree. Empty when
the library is not loaded."""


class NativeBlock:
    """A whole pre-norm decoder block in one native call (``bitnet_block_forward``)::

        x += o(sub_norm(attention(rotary(q|k|v(attn_norm(x))))))
        x += down(post_norm(act(gate(h)) * up(h))),   h = ffn_norm(x)

    Args:
        groups: dict with the :class:`BitLinearGroup` s ``qkv`` (q, k, v), ``o``, ``gate_up`` (gate, up;
            or up alone when not gated) and ``down``.
        norms: dict ``attn_norm``, ``sub_norm``, ``ffn_norm``, ``post_norm`` -> (weight float32 or None, eps);
            attn_norm and ffn_norm are required.
        heads, kv_heads, head_dim: attention shape. activation: one of :data:`BLOCK_ACTIVATIONS`.
        cos, sin: rotary tables (L, head_dim) float32.

    ``block(x, k_cache, v_cache, positions)`` updates x (B*T, dim) float32 contiguous in place, for B
    rows of T tokens, row b's tokens at positions[b] + t (int64 (B,)), and appends to the caches
    (B, kv_heads, max_len, head_dim), float32, float16 or int8 (:data:`KV_DTYPES`; int8 with
    ``k_scale=``/``v_scale=``, see :func:`attention_step`).
    """

    def __init__(self, groups: dict, norms: dict, heads: int, kv_heads: int, head_dim: int, activation: str,
                 cos: torch.Tensor, sin: torch.Tensor):
        if activation not in BLOCK_ACTIVATIONS:
            raise ValueError(f"activation must be one of {BLOCK_ACTIVATIONS}, got {activation!r}")
        qkv, o, gu, down = groups["qkv"], groups["o"], groups["gate_up"], groups["down"]
        if len(qkv.sizes) != 3 or len(o.sizes) != 1 or len(down.sizes) != 1 or len(gu.sizes) not in (1, 2):
            raise ValueError("groups must hold q|k|v, o, gate|up (or up) and down")
        if norms.get("attn_norm", (None,))[0] is None or norms.get("ffn_norm", (None,))[0] is None:
            raise ValueError("attn_norm and ffn_norm weights are required")
        for t in (cos, sin):
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError("cos and sin must be contiguous float32 tables")
        b = _Block()
        b.dim, b.hidden, b.heads, b.kv_heads, b.head_dim = o.total, down.in_features, heads, kv_heads, head_dim
        b.bits, b.activation, b.gated, b.act_eps = qkv.bits, BLOCK_ACTIVATIONS.index(activation), int(len(gu.sizes) == 2), qkv.eps
        keep = []
        for name in ("attn_norm", "sub_norm", "ffn_norm", "post_norm"):
            w, eps = norms.get(name, (None, 0.0))
            if w is not None:
                w = w.detach().to(torch.float32).contiguous()
                keep.append(w)
            setattr(b, name, _ptr(w))
            setattr(b, name + "_eps", float(eps))
        for name, g in (("qkv", qkv), ("o", o), ("gate_up", gu), ("down", down)):
            s = getattr(b, name)
            s.n, s.format, s.in_features, s.ldw = len(g.sizes), g.format, g.in_features, g.ldw
            for i in range(len(g.sizes)):
                s.w[i], s.rows[i], s.scale[i], s.bias[i] = g._w[i], g._n[i], g._s[i], g._b[i]
        b.cos_table, b.sin_table, b.table_len = cos.data_ptr(), sin.data_ptr(), cos.shape[0]
        self._struct, self._keep = b, (groups, keep, cos, sin)
        self.dim = b.dim

    def __call__(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions,
                 k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None) -> None:
        """positions: an int (every row starts there) or an int64 (B,) tensor. The caller guarantees the
        layouts (x contiguous float32 (B*T, dim), caches contiguous (B, kv_heads, max_len, hd) of one dtype of
        :data:`KV_DTYPES`; an int8 one with its scales)."""
        lib = _need()
        batch = k_cache.shape[0]
        if isinstance(positions, int):
            pos = (ctypes.c_int64 * batch)(*([positions] * batch))
        else:
            if positions.dtype != torch.int64 or positions.numel() != batch or not positions.is_contiguous():
                raise ValueError(f"positions must be an int or a contiguous int64 tensor of {batch} start positions")
            pos = positions.data_ptr()
        if x.shape[0] % batch or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B*T, {self.dim}) for B={batch} cache rows, got {tuple(x.shape)}")
        code = kv_dtype_code(k_cache, v_cache)
        ks, vs = _kv_scale_ptrs(k_cache, k_scale, v_scale)
        rc = lib.bitnet_block_forward(ctypes.byref(self._struct), x.data_ptr(), batch, x.shape[0] // batch,
                                      k_cache.data_ptr(), v_cache.data_ptr(), ks, vs, code, k_cache.shape[2], pos, -1)
        _check_rc(rc, "block_forward (a position beyond the cache or rotary table?)")
