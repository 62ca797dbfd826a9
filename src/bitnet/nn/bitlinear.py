"""BitLinear: the training form of a 1-bit / 1.58-bit linear layer (drop-in for ``nn.Linear``).

Forward (both papers): ``y = Quant_w(W) @ Quant_x(Norm(x))`` with fake quantisation and the
straight-through estimator, so the fp32 master weights receive the gradients. Numerically

    y = (xq @ Wq^T) * w_scale / s  (+ bias)

where ``Wq, w_scale = weight_quant(W)`` (ternary absmean or binary sign) and
``xq, s = activation_quant(x)`` (per-token absmax). ``bitnet.pack`` turns the layer into its
inference form (:class:`bitnet.nn.PackedBitLinear`) that stores ``Wq`` at 2 bits per weight.

Two implementations of the same math live here:

* the *reference* path, composed of the public functions (:class:`~bitnet.nn.RMSNorm`,
  :func:`~bitnet.quant.fake_quant_activation`, :func:`~bitnet.quant.fake_quant_weight`, ``F.linear``)
  and differentiated by autograd;
* the *fused* path (default for float32 on CPU/CUDA): one ``torch.autograd.Function`` that runs
  RMSNorm, the activation fake quantiser and the matmul, the elementwise passes in place over
  cache-sized row chunks, and whose backward writes the STE gradients by hand. Its forward repeats the
  reference's floating-point operations one for one (bit-identical outputs); its backward repeats
  autograd's formulas (equal gradients up to the summation order of the norm weight's gradient).
  In training mode the fake-quantised weight is cached until the weight changes (its ``_version``
  counter, or any ``torch.optim`` step; writes through ``weight.data`` are invisible to both: call
  :meth:`BitLinear.clear_cache` after them), and an input shared by several norm-free BitLinears
  (q/k/v, gate/up) is quantised once.

``fused_bitlinear(False)`` forces the reference path (e.g. to check the fused one against it).
"""

from __future__ import annotations

import collections

import contextlib
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..quant import EPS, check_bits, fake_quant_activation, fake_quant_weight, normalize_weight_kind, ste, weight_quant
from .norm import RMSNorm

_FUSED = True
_OPTIMIZER_STEPS = 0          # bumped after every torch.optim step: invalidates the weight caches
_SHARED_INPUT = threading.local()   # .entry = (weakref(x), x._version, bits, strength, xs)


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _OPTIMIZER_STEPS
    _OPTIMIZER_STEPS += 1


register_optimizer_step_post_hook(_count_optimizer_step)


@contextlib.contextmanager
def fused_bitlinear(enabled: bool = True):
    """Context manager choosing the fused (default) or the reference BitLinear implementation."""
    global _FUSED
    previous, _FUSED = _FUSED, bool(enabled)
    try:
        yield
    finally:
        _FUSED = previous


def check_in_features(x: torch.Tensor, in_features: int, layer: str) -> None:
    """Raise a clear error when the last dimension of ``x`` is not ``in_features``."""
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"{layer} expects input with last dimension in_features={in_features}, got shape {tuple(x.shape)}"
        )


# ------------------------------------------------------------------------------------ fused pieces

_CHUNK_ELEMENTS = 1 << 16
"""Elements per row chunk of the fused passes on CPU (256 KiB of fp32: the temporaries stay in L2)."""


def _row_chunks(x2: torch.Tensor) -> list[tuple[int, int]]:
    """Row ranges [a, b) of a (rows, features) tensor: cache-sized on CPU, the whole tensor elsewhere."""
    rows, features = x2.shape
    step = max(1, _CHUNK_ELEMENTS // max(features, 1)) if x2.device.type == "cpu" else max(rows, 1)
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _fake_quant_act_into(y: torch.Tensor, out: torch.Tensor, bits: int, strength: float) -> torch.Tensor:
    """Write the values of ``fake_quant_activation(y, bits, strength)`` into ``out`` (y's shape), in place.

    Same floating-point operations as :func:`~bitnet.quant.activation_quant` + :func:`~bitnet.quant.ste`:
    ``s = Qp / max|y|``, ``d = clamp(round(y * s)) / s``, result ``y + (d - y)`` (``y + lambda (d - y)``).
    ``max|y|`` is taken as ``max(max y, -min y)`` (no ``|y|`` temporary; exactly equal, and faster on
    CPU than both ``abs().amax()`` and ``aminmax``).
    """
    qp = 2 ** (bits - 1) - 1
    absmax = torch.maximum(y.amax(dim=-1, keepdim=True), y.amin(dim=-1, keepdim=True).neg_())   # (rows, 1)
    s = (qp / absmax.float().clamp(min=EPS)).to(y.dtype)           # (rows, 1) Qp / max|y|
    d = torch.mul(y, s, out=out)
    d.round_().clamp_(-qp - 1, qp).div_(s)                          # xq / s
    d.sub_(y)                                                       # STE: y + lambda * (d - y)
    if strength != 1.0:
        d.mul_(strength)
    return d.add_(y)


def _fake_quant_act_values(x: torch.Tensor, bits: int, strength: float) -> torch.Tensor:
    """``fake_quant_activation(x, bits, strength)`` values (no autograd), row chunk by row chunk."""
    x2 = x.reshape(-1, x.shape[-1])
    xs = torch.empty_like(x2, memory_format=torch.contiguous_format)
    for a, b in _row_chunks(x2):
        _fake_quant_act_into(x2[a:b], xs[a:b], bits, strength)
    return xs.view(x.shape)


# accumulation dtype of RMSNorm's mean(x^2) per device type (see bitnet.nn.norm.RMSNorm.forward)
_NORM_ACC = collections.defaultdict(lambda: torch.float64, mps=torch.float32)


def _norm_quant_forward(x2: torch.Tensor, weight: torch.Tensor | None, eps: float, bits: int, strength: float):
    """RMSNorm (as :class:`RMSNorm` computes it) then the activation fake quantiser, per row chunk.

    x2 (N, in) float32. Returns (xs, r): fake-quantised values (N, in) and 1/rms (N, 1).
    """
    xs = torch.empty_like(x2)
    r = torch.empty(x2.shape[0], 1, dtype=x2.dtype, device=x2.device)
    chunks = _row_chunks(x2)
    buf = torch.empty(chunks[0][1] - chunks[0][0] if chunks else 0, x2.shape[1], dtype=x2.dtype, device=x2.device)
    for a, b in chunks:
        xc, t = x2[a:b], buf[:b - a]
        # 1 / rms as RMSNorm computes it: mean(x^2) summed in float64, then rounded to float32
        ms = torch.linalg.vector_norm(xc, dim=-1, keepdim=True, dtype=_NORM_ACC[xc.device.type]).square()
        torch.rsqrt((ms / x2.shape[1]).float() + eps, out=r[a:b])
        y = torch.mul(xc, r[a:b], out=t)                            # x / rms
        if weight is not None:
            y = torch.mul(y, weight, out=y)                         # * g  (not y.mul_(g): slow on CPU)
        _fake_quant_act_into(y, xs[a:b], bits, strength)
    return xs, r


def _norm_backward(gy: torch.Tensor, x2, r, weight, x_shape):
    """Autograd's gradient of :class:`RMSNorm`, operation for operation, per row chunk.

    gy (N, in) gradient w.r.t. the norm's output (overwritten by grad_x). Returns (grad_x, grad_weight);
    grad_weight sums the chunks' partial sums (the one difference to autograd: summation order).
    """
    chunks = _row_chunks(x2)
    rows = chunks[0][1] - chunks[0][0] if chunks else 0
    n_buf, gn_buf = (torch.empty(rows, x2.shape[1], dtype=x2.dtype, device=x2.device) for _ in range(2))
    grad_w = torch.zeros_like(weight) if weight is not None else None
    for a, b in chunks:
        gyc, xc, rc = gy[a:b], x2[a:b], r[a:b]
        if weight is not None:
            n = torch.mul(xc, rc, out=n_buf[:b - a])                # x / rms, as in the forward
            grad_w += torch.mul(n, gyc, out=n).sum(dim=0)           # d/dg of n * g
            gn = torch.mul(gyc, weight, out=gn_buf[:b - a])         # d/dn of n * g
        else:
            gn = gn_buf[:b - a].copy_(gyc)
        grad_r = torch.mul(gn, xc, out=gyc).sum(dim=-1, keepdim=True)   # (rows, 1) d/dr of x * r
        grad_ms = (-0.5 * grad_r) * rc.pow(3)                       # rsqrt'(a) = -a^(-3/2) / 2
        gxc = torch.add(xc, xc, out=gyc).mul_(grad_ms / x2.shape[1])   # d mean(x^2)/dx = 2x / D
        # (x + x is 2 * x exactly; torch.mul by a Python scalar with out= is very slow on CPU)
        gxc.add_(gn.mul_(rc))                                       # + r * grad_n
    return gy, grad_w


class _BitLinearFunction(torch.autograd.Function):
    """``F.linear(xs, ws, bias)`` with ``xs = STE(Quant_x(Norm(x)))`` and ``ws = STE(Quant_w(W))``.

    Inputs: x (..., in); norm_weight (in,) or None; weight (out, in) fp master; bias (out,) or None;
    ws (out, in) the fake-quantised weight values; xs (..., in) the fake-quantised input values when
    already known (norm off), else None. Gradients: straight through both quantisers, through the norm.
    """

    @staticmethod
    def forward(ctx, x, norm_weight, weight, bias, ws, xs, has_norm, norm_eps, bits, strength):
        r = None
        if has_norm:
            x2 = x.reshape(-1, x.shape[-1])
            xs, r = _norm_quant_forward(x2, norm_weight, norm_eps, bits, strength)
            xs = xs.view(x.shape)
        elif xs is None:
            xs = _fake_quant_act_values(x, bits, strength)
        out = F.linear(xs, ws, bias)
        ctx.has_norm, ctx.x_shape = has_norm, x.shape
        ctx.save_for_backward(xs, ws, norm_weight, x if has_norm else None, r)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xs, ws, norm_weight, x, r = ctx.saved_tensors
        need_x, need_nw, need_w, need_b = ctx.needs_input_grad[:4]
        g2 = grad_out.reshape(-1, ws.shape[0])                      # (N, out)
        grad_x = grad_nw = grad_w = grad_b = None
        if need_w:
            grad_w = xs.reshape(-1, ws.shape[1]).t().mm(g2).t()      # (out, in), straight through Quant_w
        if need_b:
            grad_b = g2.sum(0)
        if need_x or need_nw:
            gy = g2.mm(ws)                                           # (N, in), straight through Quant_x
            if ctx.has_norm:
                gy, grad_nw = _norm_backward(gy, x.reshape(-1, x.shape[-1]), r, norm_weight, ctx.x_shape)
            grad_x = gy.view(ctx.x_shape)
        return (grad_x if need_x else None, grad_nw if need_nw else None, grad_w, grad_b,
                None, None, None, None, None, None)


def _shared_input_values(x: torch.Tensor, bits: int, strength: float) -> torch.Tensor:
    """Fake-quantised values of a norm-free input; reused when the same unchanged tensor comes again."""
    if x.is_inference():                        # (inference tensors have no version counter)
        with torch.no_grad():
            return _fake_quant_act_values(x, bits, strength)
    entry = getattr(_SHARED_INPUT, "entry", None)
    if entry is not None:
        ref, version, e_bits, e_strength, xs = entry
        if ref() is x and version == x._version and e_bits == bits and e_strength == strength:
            return xs
    with torch.no_grad():
        xs = _fake_quant_act_values(x.detach(), bits, strength)
    _SHARED_INPUT.entry = (weakref.ref(x), x._version, bits, strength, xs)
    return xs


class BitLinear(nn.Linear):
    """Linear layer with ternary (b1.58) or binary (b1) weights and k-bit per-token activations.

    Args:
        in_features, out_features, bias: as ``nn.Linear`` (bias defaults to False, as in the papers).
        weight_kind: ``"1.58"`` ternary absmean (default) or ``"1"`` binary sign.
        bits: activation bits, 2..8 (default 8).
        norm: apply an RMSNorm to the input before quantising it (default True). Switch it off
            where the architecture already normalises the input (e.g. converted pretrained models).
        quant_strength: lambda in [0, 1] of ``x + lambda * (q(x) - x).detach()``; 1 is full
            quantisation, lower values warm up a converted full-precision model.

    In training mode the fake-quantised weight is cached between calls while the weight is unchanged
    (tracked by its version counter and by ``torch.optim`` steps), which costs one extra copy of the
    weight. After writing the weight through ``.data`` outside an optimizer, call :meth:`clear_cache`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        weight_kind: str = "1.58",
        bits: int = 8,
        norm: bool = True,
        norm_eps: float = 1e-6,
        quant_strength: float = 1.0,
        device=None,
        dtype=None,
    ):
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight_kind = normalize_weight_kind(weight_kind)
        self.bits = check_bits(bits)
        self.norm = RMSNorm(in_features, eps=norm_eps, device=device, dtype=dtype) if norm else None
        self.quant_strength = float(quant_strength)
        self._weight_cache = None         # (key, fake-quantised weight values)

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Wq, scale): integer-valued weight (out, in) and its float32 scale."""
        return weight_quant(self.weight, self.weight_kind)

    def clear_cache(self) -> None:
        """Forget the cached fake-quantised weight (needed only after writing ``weight.data`` by hand)."""
        self._weight_cache = None

    def fake_quantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """Values of ``fake_quant_weight(weight)`` in ``dtype`` (no autograd history); cached in training mode."""
        w = self.weight
        if not self.training or w.is_inference():
            with torch.no_grad():
                q, scale = weight_quant(w, self.weight_kind)
                return ste(w, q * scale.to(w.dtype), self.quant_strength).to(dtype)
        key = (w, w._version, w.data_ptr(), w.dtype, w.shape, _OPTIMIZER_STEPS, self.weight_kind,
               self.quant_strength, dtype)
        cache = getattr(self, "_weight_cache", None)
        if cache is not None and len(cache[0]) == len(key) and all(
                a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(cache[0], key)):
            return cache[1]
        with torch.no_grad():
            q, scale = weight_quant(w, self.weight_kind)
            ws = ste(w, q * scale.to(w.dtype), self.quant_strength).to(dtype)   # Wq * gamma, STE values
        self._weight_cache = (key, ws)
        return ws

    def _fused_applies(self, x: torch.Tensor) -> bool:
        """The fused path runs for float32 on CPU/CUDA, outside autocast and the compiler; else the reference."""
        if not _FUSED or x.dtype != torch.float32 or x.device.type not in ("cpu", "cuda"):
            return False
        if torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
            return False
        norm_weight = None if self.norm is None else self.norm.weight
        tensors = [t for t in (self.weight, self.bias, norm_weight) if t is not None]
        return all(t.dtype == x.dtype and t.device == x.device for t in tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_in_features(x, self.in_features, "BitLinear")
        if self._fused_applies(x):
            ws = self.fake_quantized_weight(x.dtype)
            if self.norm is not None:
                return _BitLinearFunction.apply(x, self.norm.weight, self.weight, self.bias, ws, None, True,
                                                self.norm.eps, self.bits, self.quant_strength)
            xs = _shared_input_values(x, self.bits, self.quant_strength)
            return _BitLinearFunction.apply(x, None, self.weight, self.bias, ws, xs, False, 0.0,
                                            self.bits, self.quant_strength)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The composed definition (norm, fake quantisers with STE, ``F.linear``), differentiated by autograd."""
        if self.norm is not None:
            x = self.norm(x)                                                  # SubLN before Quant
        x = fake_quant_activation(x, self.bits, self.quant_strength)          # xq / s, STE
        w = fake_quant_weight(self.weight, self.weight_kind, self.quant_strength)  # Wq * gamma, STE
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, weight_kind={self.weight_kind}, bits={self.bits}, "
            f"norm={self.norm is not None}"
        )


def set_quant_strength(model: nn.Module, strength: float) -> nn.Module:
    """Set lambda (0 = full precision, 1 = fully quantised) on every BitLinear of ``model``."""
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    for module in model.modules():
        if isinstance(module, BitLinear):
            module.quant_strength = float(strength)
    return model
