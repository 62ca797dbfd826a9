"""Shared test settings."""

import pytest

from bitnet.convert.pack import torch_threads


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch intra-op thread per test: the 2-core CI box is shared, and OpenMP barriers between
    oversubscribed threads turn millisecond ops into tens of milliseconds."""
    with torch_threads(1):
        yield
