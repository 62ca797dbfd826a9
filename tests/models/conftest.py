"""Fixtures shared by the model tests."""

import pytest

from bitnet.ops import cpu as native


@pytest.fixture(params=native.supported_isas())
def isa(request):
    """Each ISA this CPU and build support, as the default of the native calls (projections, head, block)."""
    old = native.default_isa()
    native.set_default_isa(request.param)
    try:
        yield request.param
    finally:
        native.set_default_isa(old)
