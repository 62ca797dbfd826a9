"""Run-time policy of CPU inference: is the native backend doing a model's matmuls, and how many torch
threads run beside it.

Sits above ``ops`` and ``nn`` and below everything that runs a model (``generate``, ``serve``,
``bench``): it only asks questions about modules and the ops backend.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import ops
from .nn.packed import PackedBitLinear


def native_decode(model: nn.Module) -> bool:
    """True when ``model`` is packed and on the CPU with the native backend doing its matmuls."""
    param = next(iter(model.buffers()), None)
    device = "cpu" if param is None else param.device
    return ops.native_on(device) and any(isinstance(m, PackedBitLinear) for m in model.modules())


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``torch.set_num_threads(n)`` (no change for None), restoring the old count.

    Decoding a packed model on the CPU, the native kernels (with their own thread pool) do the heavy
    work; torch's intra-op threads then only add barrier waits around tiny ops (norms, rotary,
    attention at batch 1) and compete with the kernel's threads: one torch thread is 1.5-3x faster there.
    """
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None and n != old:
            torch.set_num_threads(old)
