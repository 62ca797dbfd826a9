"""The fused CPU inference path: a packed :class:`~bitnet.models.TransformerBlock` as one native call.

A block declares what it computes as a :class:`~bitnet.models.transformer.BlockSpec`
(``TransformerBlock.spec()``, beside its ``forward``); this module builds the native block
(:class:`bitnet.ops.cpu.NativeBlock` -> ``bitnet_block_forward`` in csrc/block.cpp) from that spec and
runs it: RMSNorm + int8 quantisation once per input, q|k|v and gate|up each in one pass over their
weights, rotary + KV-cache append + attention, the activation and both residuals, with the thread pool
reading the next projection's weights into cache while attention runs. The modules stay the one truth:
nothing here restates the block's math, and tests/models/test_fused_block.py checks this path against
the module path with the switch below.

**The switch.** ``BITNET_FUSED=0`` in the environment (read at import), :func:`set_fused(False)
<set_fused>` or ``with fused_path(False):`` make every block run its modules (process-wide).
:func:`native_block_calls` counts the native block calls made so far.

**When a block runs natively** (else it runs its modules, with the same results): the switch is on, the
block is in eval mode, its input is a float32 CPU tensor that needs no gradient, outside torch.compile
and torch function/dispatch modes, with the native CPU backend selected; the block is one the native
code can express (:func:`unsupported` is None: packed projections (I2, or TQ1 from
:func:`bitnet.convert.tq1.repack_tq1`; one format per q|k|v and gate|up set) without their own norm, RMSNorm
norms, an activation of :data:`bitnet.ops.cpu.BLOCK_ACTIVATIONS`, float32 rotary tables; a packed block
that is not says so in a one-time warning, and ``block.native_reason`` says why); its KV cache is
float32, float16 or int8 (:data:`bitnet.ops.cpu.KV_DTYPES`: the native code rounds what it writes as
``Tensor.half()`` / :func:`bitnet.nn.attention.quantize_kv` do, as the module path's cache does) and contiguous, or there is none, the call starts at position 0 and has at most
:data:`UNCACHED_MAX_TOKENS` tokens per row (a scratch cache is used for the call); start positions are
an int, or an int64 tensor of per-row positions for one-token steps; and no forward hook is registered
on the blocks (hooks on sub-modules of a block do not run on this path).

**How close to the module path.** The integer matmuls are exact and the RMSNorms agree bit for bit
(both sum squares in float64), so every int8 activation code is the same unless a float op before it
differs in its last bit, which happens in two places that cannot be made to agree: attention
(summation order, exp) and the silu / gelu gate (libm's exp / erf in C, torch's vectorised
approximations there). Such a difference moves an int8 code to its neighbour only rarely (measured in
tests/models/test_fused_block.py); where none moves, logits agree to ~3e-7 relative.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Optional

import torch
from torch.nn.modules import module as _module_globals

from .. import ops
from ..nn.attention import KVCache
from ..nn.norm import RMSNorm
from ..nn.packed import PackedBitLinear
from ..nn.tq1_linear import PackedTQ1BitLinear
from ..ops import cpu
from ..ops import tq1 as tq1_ops

ENV_VAR = "BITNET_FUSED"
"""Environment variable of the switch: ``0`` forces the module path everywhere, ``1`` (default) allows
the fused native blocks."""


def _parse_switch(value: str) -> bool:
    key = value.strip().lower()
    if key in ("", "1", "on", "true"):
        return True
    if key in ("0", "off", "false"):
        return False
    raise ValueError(f"{ENV_VAR} must be 0 (module path everywhere) or 1 (fused native blocks, the default), "
                     f"got {value!r}")


UNCACHED_MAX_TOKENS = 256
"""Longest uncached call (tokens per row) run natively. The native attention is a plain loop per query:
past ~256 tokens torch's blocked attention on the module path is faster (measured with 1 thread: 0.86x
at 256 tokens on dim 256, 1.04x on dim 1024, then 1.06-1.17x at 512-2048), while below it the single
native call wins (3-5x at 1-32 tokens on dim 256)."""

_enabled = _parse_switch(os.environ.get(ENV_VAR, ""))
_native_calls = 0
_warned: set[str] = set()


def set_fused(enabled: bool) -> None:
    """Allow (True, the default) or forbid (False: every block runs its modules) the fused native blocks,
    process-wide. Same as ``BITNET_FUSED=1`` / ``0``."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _enabled = enabled


def fused_enabled() -> bool:
    """Whether the fused native blocks are allowed (see :func:`set_fused`)."""
    return _enabled


@contextlib.contextmanager
def fused_path(enabled: bool):
    """``with fused_path(False):`` runs the module path inside the block (process-wide), then restores
    the previous setting."""
    previous = _enabled
    set_fused(enabled)
    try:
        yield
    finally:
        set_fused(previous)


def native_block_calls() -> int:
    """Native block calls (one per block per forward) made in this process so far: tests and diagnostics
    read it to know which path ran."""
    return _native_calls


# ------------------------------------------------------------------------------------------------
# From spec to native block

def _projections(spec) -> dict:
    """name -> module of every projection of a BlockSpec, in the native block's order."""
    a, f = spec.attn, spec.ffn
    named = {"attn.q": a.q, "attn.k": a.k, "attn.v": a.v, "attn.o": a.o}
    if f.gate is not None:
        named["ffn.gate"] = f.gate
    named.update({"ffn.up": f.up, "ffn.down": f.down})
    return named


_WEIGHTS = {PackedBitLinear: "w_packed", PackedTQ1BitLinear: "w_tq1"}
"""Packed projection type -> its weight buffer: I2 (the default) or the experimental TQ1 of bitnet.convert.tq1."""
_GROUPS = {PackedBitLinear: cpu.BitLinearGroup, PackedTQ1BitLinear: tq1_ops.TQ1LinearGroup}
"""... -> the native group (linear-set format) that runs it."""
_SETS = {"q|k|v": ("attn.q", "attn.k", "attn.v"), "gate|up": ("ffn.gate", "ffn.up")}


def _norms(spec) -> dict:
    """name -> RMSNorm or None of a BlockSpec, as bitnet.ops.cpu.NativeBlock names them."""
    return {"attn_norm": spec.attn_norm, "sub_norm": spec.attn.sub_norm, "ffn_norm": spec.ffn_norm,
            "post_norm": spec.ffn.post_norm}


def unsupported(spec) -> Optional[str]:
    """Why the native block cannot compute ``spec`` (a :class:`~bitnet.models.transformer.BlockSpec`),
    or None when it can."""
    if not cpu.available():
        return f"the native CPU library is not loaded ({cpu.LOAD_ERROR})"
    layers = _projections(spec)
    for name, m in layers.items():
        if type(m) not in _WEIGHTS:
            return f"{name} is {type(m).__name__}, not PackedBitLinear (pack the model: bitnet.pack)"
        if m.norm is not None:
            return f"{name} normalises its own input (linear_norm=True); the native block has block norms only"
        w = getattr(m, _WEIGHTS[type(m)])
        if w.device.type != "cpu" or not w.is_contiguous():
            return f"{name}.{_WEIGHTS[type(m)]} is not a contiguous CPU tensor"
        if type(m) is PackedTQ1BitLinear and not tq1_ops.available():
            return f"{name} has TQ1 weights and the native TQ1 kernels are not loaded ({tq1_ops.LOAD_ERROR})"
        if type(m) is PackedTQ1BitLinear and m.in_features > tq1_ops.MAX_IN_FEATURES:
            return f"{name} has TQ1 weights and in_features > {tq1_ops.MAX_IN_FEATURES} (the TQ1 kernels' limit)"
        if not _f32(m.w_scale) or (m.bias is not None and not _f32(m.bias)):
            return f"{name}'s scale or bias is not a contiguous float32 CPU tensor"
    for set_name, names in _SETS.items():
        if len({type(layers[n]) for n in names if n in layers}) > 1:
            return f"{set_name} mix weight formats (I2 and TQ1); one native call reads one format"
    if len({m.bits for m in layers.values()}) != 1:
        return "the projections quantise their inputs to different bits"
    for name, n in _norms(spec).items():
        if n is None and name in ("attn_norm", "ffn_norm"):
            return f"the block has no {name}"
        if n is not None and type(n) is not RMSNorm:
            return f"{name} is {type(n).__name__}, not RMSNorm"
        if n is not None and n.weight is not None and not _f32(n.weight):
            return f"{name}.weight is not a contiguous float32 CPU tensor"
    if spec.ffn.activation not in cpu.BLOCK_ACTIVATIONS:
        return (f"activation {spec.ffn.activation!r} has no native code (native: "
                f"{', '.join(cpu.BLOCK_ACTIVATIONS)})")
    rot = spec.attn.rotary
    if rot is None:
        return "the attention has no rotary embedding (the native attention always rotates)"
    if not (_f32(rot.cos) and _f32(rot.sin)):
        return "the rotary tables are not contiguous float32 CPU tensors"
    return None


def _f32(t: torch.Tensor) -> bool:
    """The native code reads t's storage in place: float32, contiguous, on the CPU."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()


def _slot(module: torch.nn.Module, name: str) -> dict:
    """The dict of ``module`` that holds its parameter, buffer or sub-module ``name``. The watch below is
    checked at every step: a lookup there costs ~25 ns, ``getattr`` ~500 ns (a Module.__getattr__ call)."""
    for d in (module._parameters, module._buffers, module._modules):
        if name in d:
            return d
    raise AttributeError(f"{type(module).__name__} has no parameter, buffer or sub-module {name!r}")


class FusedBlock:
    """The native form of one block, built from its spec: :attr:`native` (a
    :class:`bitnet.ops.cpu.NativeBlock` over the projection groups :attr:`groups`) and the tensors and
    sub-modules it was built from, watched so that a reload, ``.to()`` or replaced sub-module rebuilds
    it (plain attributes such as ``ffn.activation`` are read once, when it is built). Get it with
    :meth:`for_block`."""

    def __init__(self, block, spec):
        layers = _projections(spec)
        bits = next(iter(layers.values())).bits

        def group(names):
            ms = [layers[n] for n in names]
            return _GROUPS[type(ms[0])]([getattr(m, _WEIGHTS[type(m)]) for m in ms], [m.w_scale for m in ms],
                                        [m.bias for m in ms], ms[0].in_features, bits)

        gate_up = ["ffn.gate", "ffn.up"] if "ffn.gate" in layers else ["ffn.up"]
        groups = {"qkv": group(["attn.q", "attn.k", "attn.v"]), "o": group(["attn.o"]),
                  "gate_up": group(gate_up), "down": group(["ffn.down"])}
        norms = {name: (None, 0.0) if n is None else (n.weight.detach() if n.weight is not None else
                                                       torch.ones(n.dim), float(n.eps))
                 for name, n in _norms(spec).items()}
        a, rot = spec.attn, spec.attn.rotary
        self.groups = groups                                # the native projections (cpu.BitLinearGroup)
        self.native = cpu.NativeBlock(groups, norms, a.heads, a.kv_heads, a.head_dim, spec.ffn.activation,
                                      rot.cos, rot.sin)
        self.kv_heads, self.head_dim, self.table_len = a.kv_heads, a.head_dim, rot.cos.shape[0]
        # what the native block points at, as (dict, key, object) triples: every sub-module of the block,
        # every tensor the native code reads; norm weights also by storage (``param.data = ...`` keeps
        # the Parameter object)
        watched = [(m, k) for m in layers.values() for k in (_WEIGHTS[type(m)], "w_scale", "bias")]
        watched += [(n, "weight") for n in _norms(spec).values() if n is not None]
        watched += [(rot, "cos"), (rot, "sin")]
        self._watch = [(_slot(m, k), k, getattr(m, k)) for m, k in watched]
        self._watch += [(parent._modules, name, child) for parent in block.modules()
                        for name, child in parent.named_children()]
        self._storage = [(t, t.data_ptr()) for m, k in watched if isinstance(t := getattr(m, k), torch.nn.Parameter)]

    def __deepcopy__(self, memo):
        return None                      # a copied block builds its own (this one points at the original)

    @classmethod
    def for_block(cls, block) -> Optional["FusedBlock"]:
        """The block's native form, built on first use and rebuilt when what it points at was replaced;
        None when the block's spec is one the native code cannot express (see :func:`unsupported`)."""
        runner = getattr(block, "_fused_runner", None)     # a plain attribute once set: a fast read
        if runner is not None and runner.valid():
            return runner
        spec = block.spec()
        reason = unsupported(spec)
        runner = cls(block, spec) if reason is None else None
        block._fused_runner = runner
        if reason is not None and reason not in _warned and any(
                type(m) in _WEIGHTS for m in _projections(spec).values()):
            _warned.add(reason)
            warnings.warn(f"a packed {type(block).__name__} runs its modules, not the fused native block: "
                          f"{reason}", stacklevel=3)
        return runner

    def valid(self) -> bool:
        """Whether the block still holds the sub-modules and tensors this native block was built from."""
        for d, key, obj in self._watch:
            if d.get(key) is not obj:
                return False
        for t, ptr in self._storage:
            if t.data_ptr() != ptr:
                return False
        return True

    def cache_tensors(self, cache, batch: int, end: int):
        """(k, v, k_scale, v_scale) of ``cache`` if the native attention can use them (float32, float16 or
        int8 (one of :data:`bitnet.ops.cpu.KV_DTYPES`; the scales are None but for int8), contiguous,
        ``batch`` rows of this block's K/V shape, on the CPU) and the rotary table reaches position ``end``,
        else None. Raises the cache's own error when ``end`` does not fit in it."""
        k, v = cache.k, cache.v
        shape = k.shape
        if (k.dtype not in cpu.KV_DTYPES or v.dtype != k.dtype or k.device.type != "cpu" or len(shape) != 4
                or shape[0] != batch or shape[1] != self.kv_heads or shape[3] != self.head_dim
                or v.shape != shape or not (k.is_contiguous() and v.is_contiguous())):
            return None
        scales = (None, None)
        if k.dtype == torch.int8:
            scales = getattr(cache, "k_scale", None), getattr(cache, "v_scale", None)
            if not all(cpu.kv_scales_fit(k, t) for t in scales):
                return None
        if end > cache.max_len:
            raise ValueError(f"KV cache is full: position {end} exceeds its max_len={cache.max_len}")
        return (k, v) + scales if end <= self.table_len else None   # beyond: the rotary module raises its own error


# ------------------------------------------------------------------------------------------------
# Running blocks

def fused_runner(block, x: torch.Tensor) -> Optional[FusedBlock]:
    """The block's :class:`FusedBlock` if ``x`` may take the native path now (switch on, eval mode,
    float32 CPU tensor that needs no gradient, plain eager, native CPU backend), else None."""
    if not _enabled or block.training or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 3:
        return None
    if (x.requires_grad and torch.is_grad_enabled()) or not ops.native_on() or not ops._plain_eager(x):
        return None
    return FusedBlock.for_block(block)


def _start_positions(start_pos, batch: int, t: int):
    """(start positions: an int for all rows or an int64 (B,) tensor, end) for the native attention, or
    None when the module path must run (per-row positions with T > 1, or not a CPU int64 tensor)."""
    if isinstance(start_pos, torch.Tensor):
        if t != 1 or start_pos.dtype != torch.int64 or start_pos.device.type != "cpu":
            return None
        return start_pos.contiguous().view(-1), int(start_pos.max()) + 1
    return int(start_pos), int(start_pos) + t


def _global_hooks() -> bool:
    return bool(_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks)


def _run(blocks, x: torch.Tensor, caches, start_pos, check_hooks: bool) -> Optional[torch.Tensor]:
    if not len(blocks) or (caches is not None and len(caches) != len(blocks)):
        return None
    if check_hooks and (any(b._forward_hooks or b._forward_pre_hooks for b in blocks) or _global_hooks()):
        return None
    first = fused_runner(next(iter(blocks)), x)
    if first is None or any(block.training for block in blocks):
        return None
    b, t, d = x.shape
    native = _start_positions(start_pos, b, t)                # once for all blocks
    if native is None:
        return None
    positions, end = native
    # (enumerate, not blocks[1:]: a ModuleList slice builds a new ModuleList, ~10 us)
    runners = [first if i == 0 else FusedBlock.for_block(block) for i, block in enumerate(blocks)]
    if caches is None:
        # no cache: attention over the call's own tokens, from position 0, through a scratch cache
        if (not isinstance(positions, int) or positions != 0 or t > UNCACHED_MAX_TOKENS
                or any(r is None for r in runners)):
            return None
        scratch = {}
        caches = [scratch.setdefault((r.kv_heads, r.head_dim), KVCache(b, r.kv_heads, t, r.head_dim, _storage=(
            torch.empty(b, r.kv_heads, t, r.head_dim), torch.empty(b, r.kv_heads, t, r.head_dim)))) for r in runners]
    kvs = []
    for r, cache in zip(runners, caches):
        kv = None if r is None else r.cache_tensors(cache, b, end)
        if kv is None:
            return None
        kvs.append(kv)
    global _native_calls
    _native_calls += len(runners)
    y = x.reshape(b * t, d).clone(memory_format=torch.contiguous_format)      # (BT, D), updated in place
    for r, (k, v, k_scale, v_scale), cache in zip(runners, kvs, caches):
        r.native(y, k, v, positions, k_scale, v_scale)
        cache.__dict__["length"] = end                     # a plain attribute (skips Module.__setattr__)
    return y.view(b, t, d)


def run_native_stack(blocks, x: torch.Tensor, caches, start_pos) -> Optional[torch.Tensor]:
    """All ``blocks`` as native calls in one plain loop (no per-block module call), or None when any block,
    cache or argument cannot take that path, or a block has forward hooks (the caller then calls the
    blocks one by one). x (B, T, D) is not modified; returns the new hidden states. ``caches``: one
    :class:`~bitnet.nn.KVCache` per block, or None."""
    return _run(blocks, x, caches, start_pos, check_hooks=True)


def run_native_block(block, x: torch.Tensor, cache, start_pos) -> Optional[torch.Tensor]:
    """``block`` as one native call from inside its own ``forward`` (its hooks have run), or None when
    it must run its modules."""
    return _run([block], x, None if cache is None else [cache], start_pos, check_hooks=False)
