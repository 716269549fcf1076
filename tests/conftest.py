import os

import pytest
import uvloop

from rccs import _fastpath


def pytest_report_header(config):
    return f"rccs fastpath implementation: {_fastpath.IMPLEMENTATION}"


def pytest_configure(config):
    expected = os.environ.get("RCCS_EXPECT_IMPLEMENTATION")
    if expected and expected != _fastpath.IMPLEMENTATION:
        raise pytest.UsageError(
            f"RCCS_EXPECT_IMPLEMENTATION={expected} but the fast path in use is {_fastpath.IMPLEMENTATION!r}"
            " (is the compiled extension built?)"
        )


def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop}
