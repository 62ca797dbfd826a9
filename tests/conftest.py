"""Shared test settings."""

import os

import torch

# Triton decides between its interpreter and the GPU compiler when it is first imported, and some test
# modules import it indirectly at collection time (transformers does): without a GPU, choose the
# interpreter here, before any of them, so the Triton kernel tests run on CPU instead of skipping.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from bitnet.runtime import torch_threads  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch intra-op thread per test: the 2-core CI box is shared, and OpenMP barriers between
    oversubscribed threads turn millisecond ops into tens of milliseconds."""
    with torch_threads(1):
        yield
