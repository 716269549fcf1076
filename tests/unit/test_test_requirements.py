"""The test extra's lower bounds admit no version the suite cannot run on.

A pin that is too low passes wherever a newer version happens to be installed, so the suite cannot notice it
by running: each feature it needs is listed here with the first version that has it.
"""

import asyncio
import inspect
import tomllib
from pathlib import Path

import uvloop
import websockets
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"

# distribution -> (first version with what the suite uses, what that is)
NEEDED = {
    "pytest-asyncio": ("1.4", "the pytest_asyncio_loop_factories hook in tests/conftest.py"),
    "pytest": ("8.4", "the oldest pytest that pytest-asyncio 1.4 supports"),
    "websockets": ("15", "websockets.connect(..., proxy=None) in the crash and hand-off tests"),
    "jsonschema": ("4.18", "Draft202012Validator with referencing, in test_admin_api"),
}


def declared_lower_bounds() -> dict[str, Version]:
    extra = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["test"]
    bounds = {}
    for line in extra:
        requirement = Requirement(line)
        lows = [Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "==", "~=")]
        if lows:
            bounds[requirement.name] = max(lows)
    return bounds


def test_every_test_dependency_is_pinned_at_or_above_the_first_version_the_suite_runs_on():
    bounds = declared_lower_bounds()
    too_low = {name: f"declared >={bounds.get(name)}, needs >={first} for {why}"
               for name, (first, why) in NEEDED.items() if bounds.get(name) is None or bounds[name] < Version(first)}
    assert not too_low


def test_no_test_dependency_is_listed_twice():
    extra = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["test"]
    names = [Requirement(line).name for line in extra]
    assert len(names) == len(set(names))


async def test_async_tests_run_on_uvloop():
    # What the conftest hook is for: an ignored hook would leave the tests on the default asyncio loop.
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


def test_websockets_client_takes_the_proxy_argument_the_suite_passes():
    assert "proxy" in inspect.signature(websockets.connect).parameters
