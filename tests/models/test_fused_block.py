"""The fused native path of packed TransformerBlocks (bitnet.models.fused_block) against the module path.

Every parity test runs both paths through the switch (``bitnet.models.fused_path``) and checks that each
really ran: the native block calls are counted, and forward hooks on the blocks' attention and
feed-forward modules (which only the module path calls) count the module path.

How close the paths can be, measured (48 decodes of 65 steps over these models, each step run on both
paths from the same KV cache): the integer matmuls are exact and the RMSNorms agree bit for bit, so the
int8 activation codes agree unless an inexact float op before a quantiser moved one to its neighbour.
Two such ops cannot be made to agree: attention (summation order, exp) and the silu / gelu gate (libm's
exp / erf in C against torch's vectorised approximations). 66 % of the steps were bit-identical, the
others within 3.4e-7 relative, except 0.3 % where a code moved (at most 1 step of a decode): a random
model's logits then move by up to 1.8e-2 relative. Hence :func:`assert_step_parity`: median step within
1e-6, at most 1 step in 20 beyond 1e-5, none beyond 6e-2; a change of the math on one side alone moves
every step. A moved code that lands in the KV cache stays there, so two free-running decodes drift
apart by up to that much for the rest of the run: there the greedy tokens must agree (except at a tie
within that distance) and the logits stay within 6e-2.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import bitnet
import bitnet.ops as ops
from bitnet.models import BitNetTransformer, fused_enabled, fused_path, native_block_calls, set_fused
from bitnet.models.fused_block import UNCACHED_MAX_TOKENS, FusedBlock, _parse_switch, fused_runner, unsupported
from bitnet.nn import KVCache
from bitnet.nn.feedforward import ACTIVATIONS
from bitnet.ops import cpu as native

from .kv_fill import fill_random

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native library not built: {native.LOAD_ERROR}")

VOCAB = 97
MEDIAN_TOL = 1e-6        # a step where no int8 code moved: <= 3.4e-7 measured
STEP_TOL = 1e-5          # ... so a step beyond it is one where a code moved
MOVED_FRACTION = 0.05    # steps where a code moved: 0.3 % measured, at most 1 of 65 in a decode
MAX_TOL = 6e-2           # one moved code in a random model: <= 1.8e-2 measured (2.8e-2 free-running)


def packed_model(kv_heads=2, activation="silu", seed=0, depth=2, max_seq_len=96):
    torch.manual_seed(seed)
    m = BitNetTransformer(num_tokens=VOCAB, dim=128, depth=depth, heads=8, kv_heads=kv_heads,
                          max_seq_len=max_seq_len, activation=activation).eval()
    return bitnet.pack(m)


class Paths:
    """Runs calls of ``model`` on one path or the other and asserts that path really ran: native block
    calls counted, and hooks on every block's attention and feed-forward module (only the module path
    calls them)."""

    def __init__(self, model):
        self.module_calls = 0
        self._handles = [m.register_forward_hook(self._count) for block in model.layers
                         for m in (block.attn, block.ffn)]

    def _count(self, *args):
        self.module_calls += 1

    def fused(self, fn):
        assert fused_enabled()
        calls, module = native_block_calls(), self.module_calls
        out = fn()
        assert native_block_calls() > calls, "the fused path ran no native block"
        assert self.module_calls == module, "the fused path called attention / feed-forward modules"
        return out

    def module(self, fn):
        calls, module = native_block_calls(), self.module_calls
        with fused_path(False):
            out = fn()
        assert native_block_calls() == calls, "the switch did not keep the native blocks off"
        assert self.module_calls > module, "the module path did not run"
        return out

    def both(self, fn):
        """(fused fn(), module fn())."""
        return self.fused(fn), self.module(fn)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


def both_paths(model, fn):
    with Paths(model) as p:
        return p.both(fn)


def step_errors(fused: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per step (row of (..., V) logits): max |fused - ref| / max |ref|."""
    fused, ref = fused.reshape(-1, fused.shape[-1]), ref.reshape(-1, ref.shape[-1])
    return (fused - ref).abs().amax(-1) / ref.abs().amax(-1)


def assert_step_parity(fused: torch.Tensor, ref: torch.Tensor) -> None:
    """Logits (..., V) of both paths, computed from the same state, agree as closely as the inexact float
    ops allow (see the module docstring)."""
    err = step_errors(fused, ref)
    assert err.median() <= MEDIAN_TOL, f"median step error {err.median():.2e}: {err.tolist()}"
    assert (err > STEP_TOL).float().mean() <= MOVED_FRACTION, f"too many steps beyond {STEP_TOL}: {err.tolist()}"
    assert err.max() <= MAX_TOL, f"worst step {err.max():.2e}"


def assert_same_greedy_run(fused: torch.Tensor, ref: torch.Tensor) -> int:
    """Free-running greedy logits (steps, V) of both paths: the same tokens, except that the runs may part
    where the module path's two best logits lie within MAX_TOL (a tie at this rounding); logits within
    MAX_TOL up to there. Returns the number of steps that agree."""
    ft, rt = fused.argmax(-1), ref.argmax(-1)
    differ = (ft != rt).nonzero()
    n = len(rt) if len(differ) == 0 else int(differ[0])
    if n < len(rt):
        top2 = ref[n].topk(2).values
        assert top2[0] - top2[1] <= MAX_TOL * ref[n].abs().max(), f"greedy tokens part at step {n}"
    assert step_errors(fused[:n + 1], ref[:n + 1]).max() <= MAX_TOL
    return n


def clone_caches(caches):
    out = []
    for c in caches:
        n = KVCache(c.k.shape[0], c.k.shape[1], c.max_len, c.k.shape[3], _storage=tuple(t.clone() for t in c.tensors()))
        n.length = c.length
        out.append(n)
    return out


def stepwise(paths: Paths, model, caches, first: torch.Tensor, positions, steps: int):
    """Greedy decode on the module path; before every step a copy of its KV caches takes the same step on
    the fused path. ``first`` (B, P): prompts of one length at ``positions`` 0, or (B, 1) tokens of rows
    whose caches are filled up to ``positions`` (a LongTensor (B,)). Returns (fused, module) logits
    (B, steps + 1, V)."""
    fused, ref, tok, pos = [], [], first, positions
    for _ in range(steps + 1):
        twin = clone_caches(caches)
        fused.append(paths.fused(lambda: model(tok, caches=twin, start_pos=pos))[:, -1])
        ref.append(paths.module(lambda: model(tok, caches=caches, start_pos=pos))[:, -1])
        pos = pos + tok.shape[1]
        tok = ref[-1].argmax(-1, keepdim=True)
    return torch.stack(fused, 1), torch.stack(ref, 1)


def assert_close_forward(fused: torch.Tensor, ref: torch.Tensor) -> None:
    """A whole forward of several positions on each path: a code moved at one position can reach the
    later ones through the keys and values, so only the bound of a moved code holds everywhere (the
    tests that use it look for stale or wrong weights, which move logits by O(1))."""
    assert step_errors(fused, ref).max() <= MAX_TOL


def free_greedy(model, prompt: torch.Tensor, steps: int, kv_dtype=None) -> torch.Tensor:
    """Greedy cached decode of ``prompt`` (1, P) on whichever path is on (caches of ``kv_dtype``, None: the
    model's): logits (steps + 1, V)."""
    caches = model.new_caches(1, prompt.shape[1] + steps, dtype=kv_dtype)
    logits = [model(prompt, caches=caches, start_pos=0)[0, -1]]
    for i in range(steps):
        logits.append(model(logits[-1].argmax().view(1, 1), caches=caches, start_pos=prompt.shape[1] + i)[0, -1])
    return torch.stack(logits)


# ------------------------------------------------------------------------------------------------
# The switch

def test_switch_api_and_env_parsing():
    assert fused_enabled()
    with fused_path(False):
        assert not fused_enabled()
        with fused_path(True):
            assert fused_enabled()
        assert not fused_enabled()
    assert fused_enabled()
    set_fused(False)
    try:
        assert not fused_enabled()
    finally:
        set_fused(True)
    with pytest.raises(TypeError, match="bool"):
        set_fused(0)
    assert _parse_switch("0") is False and _parse_switch(" off ") is False and _parse_switch("1") is True
    assert _parse_switch("") is True                          # unset / empty: the default
    with pytest.raises(ValueError, match="BITNET_FUSED must be 0 .* or 1"):
        _parse_switch("maybe")


def test_env_var_forces_the_module_path():
    """BITNET_FUSED=0 in a fresh process: no native block call, same logits as the module path here."""
    code = ("import torch, bitnet\n"
            "from bitnet.models import BitNetTransformer, fused_enabled, native_block_calls\n"
            "torch.manual_seed(0)\n"
            "m = BitNetTransformer(num_tokens=97, dim=128, depth=2, heads=8, kv_heads=2, max_seq_len=96)\n"
            "m = bitnet.pack(m.eval())\n"
            "caches = m.new_caches(1, 8)\n"
            "with torch.no_grad(): m(torch.arange(5).view(1, 5), caches=caches, start_pos=0)\n"
            "print(fused_enabled(), native_block_calls())\n")
    env = dict(os.environ, BITNET_FUSED="0", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "0"]
    env["BITNET_FUSED"] = "yes please"
    bad = subprocess.run([sys.executable, "-c", "import bitnet"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "BITNET_FUSED must be 0" in bad.stderr


# ------------------------------------------------------------------------------------------------
# Parity

def test_norms_and_int8_codes_equal_bit_for_bit():
    """The native RMSNorm + quantiser give the module's int8 codes exactly (a float32 sum of squares
    in torch's order made ~15 % of these rows differ)."""
    m = packed_model()
    block = m.layers[0]
    runner = FusedBlock.for_block(block)
    torch.manual_seed(1)
    for scale in (0.02, 1.0, 300.0):
        x = torch.randn(2000, 128) * scale + 0.1 * scale
        with torch.no_grad():
            h = block.attn_norm(x)
            want = torch.cat([block.attn.q_proj(h), block.attn.k_proj(h), block.attn.v_proj(h)], -1)
        got = runner.groups["qkv"](x, block.attn_norm.weight.detach(), block.attn_norm.eps)
        assert torch.equal(got, want)


@pytest.mark.parametrize("kv_heads", [2, 8])
def test_first_token_relu2_is_bit_exact(isa, kv_heads):
    """One token at position 0 (softmax over one key is exactly 1) with the exact relu2 gate: nothing
    inexact lies between the two paths, so they agree bit for bit, on every ISA."""
    m = packed_model(kv_heads, "relu2")
    tokens = torch.randint(0, VOCAB, (3, 1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fused, ref = both_paths(m, lambda: m(tokens, caches=m.new_caches(3, 4), start_pos=0))
    assert torch.equal(fused, ref)


@pytest.mark.parametrize("activation,kv_heads", [("silu", 2), ("silu", 8), ("gelu", 2), ("gelu", 8),
                                                 ("relu2", 2), ("relu2", 8)])
def test_long_cached_decode_equals_module_path(isa, activation, kv_heads):
    """A 7-token cached prefill and 64 greedy steps, GQA and MHA, each gate, each ISA: every step from the
    same KV cache on both paths, and the two free-running greedy decodes."""
    m = packed_model(kv_heads, activation)
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), Paths(m) as paths:
        fused, ref = stepwise(paths, m, m.new_caches(1, 71), prompt, 0, 64)
        assert_step_parity(fused, ref)
        free_fused, free_ref = paths.both(lambda: free_greedy(m, prompt, 64))
    assert torch.equal(free_ref, ref[0])                  # the module path is deterministic
    assert assert_same_greedy_run(free_fused, free_ref) >= 40


def test_batched_rows_at_different_positions(isa):
    """Continuous batching: rows prefilled alone to lengths 3, 9 and 5, then 32 one-token greedy steps
    at per-row positions (the server's decode step)."""
    m = packed_model()
    prompts = [torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n)) for n in (3, 9, 5)]
    with torch.no_grad(), Paths(m) as paths:
        caches = m.new_caches(3, 48)
        first = []
        for i, p in enumerate(prompts):
            rows = [c.row(i) for c in caches]
            twin = clone_caches(rows)
            f = paths.fused(lambda: m(p, caches=twin, start_pos=0))[0, -1]
            r = paths.module(lambda: m(p, caches=rows, start_pos=0))[0, -1]
            assert_step_parity(f, r)
            first.append(r.argmax().view(1))
        pos = torch.tensor([p.shape[1] for p in prompts])
        fused, ref = stepwise(paths, m, caches, torch.stack(first), pos, 32)
    assert_step_parity(fused, ref)


def test_uncached_forward_equals_cached_prefill_and_module_path(isa):
    """No cache (a scoring pass): the native blocks attend through a scratch cache from position 0, the
    same computation as a cached prefill, bit for bit."""
    m = packed_model(kv_heads=4, activation="gelu")
    tokens = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), Paths(m) as paths:
        fused, ref = paths.both(lambda: m(tokens))
        cached = paths.fused(lambda: m(tokens, caches=m.new_caches(2, 23), start_pos=0))
    assert torch.equal(fused, cached)
    assert_close_forward(fused, ref)
    assert_step_parity(fused[:, 0], ref[:, 0])            # position 0: no earlier key to carry a move


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_gate_at_extreme_values_and_a_prefill_over_the_pool(isa, activation):
    """The native gate (a vectorised exp for silu) where its inputs reach +-1e3 and beyond (exp over- and
    underflows: silu(-v) -> -0, silu(v) -> v), in a 40-token prefill whose activation rows run on the
    thread pool (2 threads): the same as the module path, finite."""
    m = packed_model(activation=activation)
    for block in m.layers:
        block.ffn.gate.w_scale.mul_(3e3)
    tokens = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(5))
    threads = native.get_num_threads()
    native.set_num_threads(2)
    try:
        with torch.no_grad(), Paths(m) as paths:
            fused, ref = paths.both(lambda: m(tokens, caches=m.new_caches(1, 40), start_pos=0))
            one = paths.fused(lambda: m(tokens[:, :1], caches=m.new_caches(1, 1), start_pos=0))
    finally:
        native.set_num_threads(threads)
    assert torch.isfinite(fused).all() and torch.isfinite(ref).all()
    assert_close_forward(fused, ref)
    assert torch.equal(one[:, 0], fused[:, 0])         # the first row alone, on this thread: bit for bit


@pytest.mark.parametrize("activation", ["silu", "gelu", "relu2"])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_gate_equals_the_unfused_gate_bit_for_bit(isa, activation, threads):
    """Gated feed-forwards of more than 3 tokens run gate, up and the activation tile by tile
    (``set_fused_gate``): logits and KV caches are bit for bit those of one gate|up GEMM followed by the
    activation, for prompts of 4..200 tokens (one and several 128-token panels, partial 16-token groups)
    and a hidden size (345) that is no multiple of the tiles; one-token steps never take that path."""
    torch.manual_seed(7)
    m = bitnet.pack(BitNetTransformer(num_tokens=VOCAB, dim=128, depth=2, heads=8, kv_heads=2, ff_mult=2.7,
                                      max_seq_len=256, activation=activation).eval())
    assert m.layers[0].ffn.gate.out_features == 345
    old_threads = native.get_num_threads()
    native.set_num_threads(threads)
    try:
        for T in (4, 5, 8, 17, 40, 130, 200):
            tokens = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(T))
            runs = {}
            for fused in (True, False):
                native.set_fused_gate(fused)
                caches = m.new_caches(1, 256)
                calls = native_block_calls()
                with torch.no_grad():
                    logits = m(tokens, caches=caches, start_pos=0)
                    step = m(tokens[:, :1], caches=caches, start_pos=T)
                assert native_block_calls() - calls == 4          # both blocks, both calls: native
                runs[fused] = (logits, step, [t[:, :, :T + 1].clone() for c in caches for t in (c.k, c.v)])
            (lf, sf, kf), (lu, su, ku) = runs[True], runs[False]
            assert torch.equal(lf, lu), T
            assert torch.equal(sf, su), T
            assert all(torch.equal(a, b) for a, b in zip(kf, ku)), T
    finally:
        native.set_fused_gate(True)
        native.set_num_threads(old_threads)


def test_set_fused_gate_returns_the_previous_setting():
    assert native.set_fused_gate(False) is True
    assert native.set_fused_gate(True) is False
    assert native.set_fused_gate(True) is True


# ------------------------------------------------------------------------------------------------
# Float16 KV caches: the native blocks read and write them in place, as the module path's KVCache does

def same_cache(a: KVCache, b: KVCache) -> bool:
    return all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.int8])
@pytest.mark.parametrize("kv_heads", [2, 8])
def test_narrow_cache_decode_equals_module_path(isa, kv_heads, kv_dtype):
    """A float16 or int8 cache (odd positions: a 7-token prefill, then 40 greedy steps), every ISA: each step
    from the same cache on both paths writes the same entries (the native rounding is Tensor.half()'s /
    quantize_kv's) and gives the same logits as closely as the float32 cache does; the free-running decodes
    agree."""
    m = packed_model(kv_heads, "relu2")
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), Paths(m) as paths:
        caches = m.new_caches(1, 48, dtype=kv_dtype)
        fused, ref = stepwise(paths, m, caches, prompt, 0, 40)
        assert_step_parity(fused, ref)
        twin = clone_caches(caches)
        last = ref[0, -1].argmax().view(1, 1)
        paths.fused(lambda: m(last, caches=twin, start_pos=47))
        paths.module(lambda: m(last, caches=caches, start_pos=47))
        if kv_dtype == torch.float16:
            for a, b in zip(twin, caches):
                assert same_bits(a.k, b.k) and same_bits(a.v, b.v)
        else:
            assert same_cache(twin[0], caches[0])      # layer 0: the same inputs, so the same codes and scales
            for a, b in zip(twin[1:], caches[1:]):     # later layers' inputs differ in the last float bits,
                assert (a.k.int() - b.k.int()).abs().max() <= 1 and (a.v.int() - b.v.int()).abs().max() <= 1
                assert torch.allclose(a.k_scale, b.k_scale, rtol=1e-4) and torch.allclose(a.v_scale, b.v_scale, rtol=1e-4)
            assert all(c.k_scale[0, :, :48].gt(0).all() for c in caches)
        free_fused, free_ref = paths.both(lambda: free_greedy(m, prompt, 40, kv_dtype))
    assert assert_same_greedy_run(free_fused, free_ref) >= 25


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.int8])
def test_narrow_cache_batched_rows_equal_module_path(isa, kv_dtype):
    """Per-row positions on a float16 or int8 cache (the server's step) against the module path."""
    m = packed_model()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad(), Paths(m) as paths:
        caches = m.new_caches(3, 40, dtype=kv_dtype)
        fill_random(caches, g)
        tokens = torch.randint(0, VOCAB, (3, 1), generator=g)
        fused, ref = stepwise(paths, m, caches, tokens, torch.tensor([2, 17, 9]), 16)
    assert_step_parity(fused, ref)


def test_half_cache_is_used_in_place():
    """The fused path takes a float16 cache (no module fallback) and leaves the float32 one alone."""
    m = packed_model()
    tokens = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        caches = m.new_caches(2, 8, dtype=torch.float16)
        before = native_block_calls()
        m(tokens, caches=caches, start_pos=0)
        assert native_block_calls() == before + len(m.layers)
    assert all(c.k.dtype == torch.float16 and c.k[:, :, :5].abs().sum() > 0 for c in caches)


# ------------------------------------------------------------------------------------------------
# Int8 KV caches: int8 entries with a float32 scale per vector, read and written in place on both paths

def test_int8_cache_is_used_in_place():
    """The fused path takes an int8 cache (no module fallback) and writes its entries and scales."""
    m = packed_model()
    tokens = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        caches = m.new_caches(2, 8, dtype="int8")
        before = native_block_calls()
        m(tokens, caches=caches, start_pos=0)
        assert native_block_calls() == before + len(m.layers)
    assert all(c.k.dtype == torch.int8 and c.k[:, :, :5].abs().amax(-1).eq(127).all()
               and c.v_scale[:, :, :5].gt(0).all() and c.v_scale[:, :, 5:].eq(0).all() for c in caches)


# ------------------------------------------------------------------------------------------------
# Spec, activation table, when the path is taken

def test_activation_table_is_read_from_the_library():
    assert native.BLOCK_ACTIVATIONS == ("silu", "gelu", "relu2")
    assert set(native.BLOCK_ACTIVATIONS) <= set(ACTIVATIONS)         # names the modules know
    assert native._lib.bitnet_block_activation(len(native.BLOCK_ACTIVATIONS)) is None
    assert native._lib.bitnet_block_activation(-1) is None
    m = packed_model()
    nb = FusedBlock.for_block(m.layers[0]).native
    nb._struct.activation = len(native.BLOCK_ACTIVATIONS)            # a code past the table: refused in C
    x = torch.randn(1, 128)
    caches = m.new_caches(1, 4)
    with pytest.raises(RuntimeError, match="invalid argument"):
        nb(x, caches[0].k, caches[0].v, 0)


def test_fused_path_only_when_allowed():
    m = packed_model()
    x = m.embed(torch.randint(0, VOCAB, (1, 3))).detach()
    block = m.layers[0]
    assert block.native_reason is None
    assert fused_runner(block, x) is not None
    assert fused_runner(block, x.double()) is None                   # float32 only
    assert fused_runner(block, x.clone().requires_grad_()) is None   # autograd needs the module path
    with fused_path(False):
        assert fused_runner(block, x) is None
    ops.set_backend("reference")
    try:
        assert fused_runner(block, x) is None                        # another backend chosen
    finally:
        ops.set_backend("auto")
    block.train()
    assert fused_runner(block, x) is None
    unpacked = BitNetTransformer(num_tokens=VOCAB, dim=128, depth=1, heads=8, max_seq_len=16).eval()
    assert FusedBlock.for_block(unpacked.layers[0]) is None          # BitLinear (training form)
    assert "not PackedBitLinear" in unpacked.layers[0].native_reason


def test_block_the_spec_cannot_express_runs_its_modules_visibly():
    """A packed block with a LayerNorm where the native block has an RMSNorm: a one-time warning, the
    reason on the block, its modules run (the other block stays native)."""
    m = packed_model()
    tokens = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        m(tokens, caches=m.new_caches(1, 8), start_pos=0)           # both blocks built natively
        m.layers[0].ffn.post_norm = nn.LayerNorm(512)                # a replaced sub-module: rebuilt
        assert m.layers[0].native_reason == "post_norm is LayerNorm, not RMSNorm"
        before = native_block_calls()
        with pytest.warns(UserWarning, match="runs its modules.*post_norm is LayerNorm"):
            fused = m(tokens, caches=m.new_caches(1, 8), start_pos=0)
        assert native_block_calls() == before + 1                    # block 1 only
        with warnings.catch_warnings():
            warnings.simplefilter("error")                           # once is enough
            m(tokens, caches=m.new_caches(1, 8), start_pos=0)
        with fused_path(False):
            ref = m(tokens, caches=m.new_caches(1, 8), start_pos=0)
    assert_close_forward(fused, ref)


def test_spec_declares_the_block():
    block = packed_model(kv_heads=4, activation="relu2").layers[0]
    spec = block.spec()
    assert spec.attn_norm is block.attn_norm and spec.ffn_norm is block.ffn_norm
    assert spec.attn.q is block.attn.q_proj and spec.attn.o is block.attn.out_proj
    assert (spec.attn.heads, spec.attn.kv_heads, spec.attn.head_dim) == (8, 4, 16)
    assert spec.attn.rotary is block.attn.rotary and spec.attn.sub_norm is block.attn.sub_norm
    assert spec.ffn.gate is block.ffn.gate and spec.ffn.activation == "relu2"
    assert unsupported(spec) is None


def test_fused_runner_follows_reloaded_weights():
    m = packed_model()
    tokens = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        before = m(tokens)
        state = {k: v.clone() for k, v in m.state_dict().items()}
        other = packed_model(seed=1)
        m.load_state_dict(other.state_dict(), assign=True)            # new storage everywhere
        assert torch.allclose(m(tokens), other(tokens))
        m.load_state_dict(state, assign=True)
        assert torch.allclose(m(tokens), before)
        norm = m.layers[1].ffn_norm.weight
        norm.data = norm.data * 2                                     # same Parameter, new storage
        with fused_path(False):
            ref = m(tokens)
        assert_close_forward(m(tokens), ref)


def test_deepcopy_of_a_model_that_ran_natively():
    m = packed_model()
    tokens = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        m(tokens)
        c = copy.deepcopy(m)
        c.layers[0].attn_norm.weight.mul_(3)                          # the copy's own weights
        assert not torch.equal(c(tokens), m(tokens))
        with fused_path(False):
            ref = c(tokens)
        assert_close_forward(c(tokens), ref)


def test_fused_cache_overflow_names_the_limit():
    m = packed_model()
    caches = m.new_caches(1, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache is full"):
        m(torch.randint(0, VOCAB, (1, 5)), caches=caches, start_pos=0)


def test_block_hooks_still_run_with_a_cache():
    """The all-blocks native loop skips module calls, so a model with block hooks goes block by block
    (each block still one native call)."""
    m = packed_model()
    calls = []
    handle = m.layers[1].register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    caches = m.new_caches(1, 8)
    tokens = torch.randint(0, VOCAB, (1, 3))
    with torch.no_grad():
        before = native_block_calls()
        hooked = m(tokens, caches=caches, start_pos=0)
        assert native_block_calls() == before + 2
        handle.remove()
        plain = m(tokens, caches=m.new_caches(1, 8), start_pos=0)
    assert calls == [torch.Size([1, 3, 128])]
    assert torch.equal(hooked, plain)
    assert caches[0].length == 3


def test_other_caches_and_positions_take_the_module_path():
    """A KV cache the native attention cannot read (not contiguous), or int32 per-row positions: the
    modules run, exactly as with the switch off."""
    m = packed_model()
    tokens = torch.randint(0, VOCAB, (2, 4))

    def strided_caches():
        def one():                                         # (B, kv_heads, max_len, hd) over (B, max_len, kv_heads, hd)
            return torch.zeros(2, 8, 2, 16).transpose(1, 2)
        return [KVCache(2, 2, 8, 16, _storage=(one(), one())) for _ in m.layers]

    def run():
        caches = strided_caches()
        m(tokens, caches=caches, start_pos=0)
        return m(tokens[:, :1], caches=caches, start_pos=torch.tensor([4, 4], dtype=torch.int32))

    with torch.no_grad():
        before = native_block_calls()
        got = run()
        assert native_block_calls() == before
        with fused_path(False):
            ref = run()
    assert torch.equal(got, ref)


def test_long_uncached_calls_take_the_module_path():
    """Past UNCACHED_MAX_TOKENS tokens without a cache, torch's blocked attention beats the native loop:
    the modules run (one token fewer: natively)."""
    m = packed_model(max_seq_len=UNCACHED_MAX_TOKENS + 1)
    tokens = torch.randint(0, VOCAB, (1, UNCACHED_MAX_TOKENS + 1))
    with torch.no_grad():
        before = native_block_calls()
        got = m(tokens)
        assert native_block_calls() == before
        with fused_path(False):
            assert torch.equal(got, m(tokens))
        m(tokens[:, 1:])
        assert native_block_calls() == before + 2
