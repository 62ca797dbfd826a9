"""Run a probe script twice, with the AVX-512 attention loops (where the CPU has them) and with the
portable ones (BITNET_ATTN_PORTABLE=1, read once per process: hence a subprocess each), and return what
each saved. The probe is a format string with ``{dims}`` (head dims) and ``{path}`` (where it saves a list
of tensors with ``torch.save``)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch


def simd_and_portable_outputs(probe: str, dims, tmp_path) -> tuple[list, list]:
    got = []
    for flag in ("0", "1"):
        path = str(tmp_path / f"out{flag}.pt")
        env = dict(os.environ, BITNET_ATTN_PORTABLE=flag)
        subprocess.run([sys.executable, "-c", probe.format(dims=dims, path=path)], env=env, check=True)
        got.append(torch.load(path, weights_only=True))
    return got[0], got[1]
