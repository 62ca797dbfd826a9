"""Which device a model goes to: ``"auto"`` resolved to cuda, mps or cpu."""

from __future__ import annotations

import torch


def resolve_device(device=None) -> torch.device:
    """``None``/``"auto"`` picks cuda, then mps, then cpu; anything else goes to ``torch.device``."""
    if device is None or (isinstance(device, str) and device.lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}") from e
