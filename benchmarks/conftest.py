import importlib
import os

import pytest

IMPLEMENTATIONS = ["python", "cython"]


def load(implementation):
    """The codec and routing modules of one implementation, side by side in one run."""
    if implementation == "python":
        return importlib.import_module("rccs._fastpath.codec"), importlib.import_module("rccs._fastpath.routing")
    try:
        return importlib.import_module("rccs._fastpath._codec"), importlib.import_module("rccs._fastpath._routing")
    except ImportError:
        if os.environ.get("RCCS_PUREPYTHON") == "1":
            pytest.skip("compiled fast path not built")
        raise


@pytest.fixture(params=IMPLEMENTATIONS)
def fastpath(request):
    return load(request.param)
