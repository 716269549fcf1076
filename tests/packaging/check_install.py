"""What a user installs: the wheel and the sdist that `make wheel` and `make sdist` put in dist/.

Run by `make test-wheel` (part of `make test`) after both are built; not part of the plain suite, which
tests the source tree. Each install goes into a fresh venv in a temporary directory.
"""

import asyncio
import os
import re
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

from rccs.auth import TokenAuthority
from rccs.client import Client
from rccs.testing import ServerProcess

REPO = Path(__file__).resolve().parents[2]
DIST = REPO / "dist"
UNIT = REPO / "deploy" / "rccs.service"
CONSOLE_FILES = ("index.html", "console.js", "console.css")
INSTALL_TIMEOUT = 900  # seconds: the sdist compiles the fast path

pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT)


def _one(pattern: str) -> Path:
    found = sorted(DIST.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {DIST} (run make wheel sdist): {found}"
    return found[0]


def _venv(where: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    return where / "bin"


def _no_compiler_env() -> dict[str, str]:
    """An environment in which any attempt to compile C fails."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("RCCS_")}
    env.update(CC="/bin/false", CXX="/bin/false", LDSHARED="/bin/false")
    return env


def _version_line(bin_dir: Path) -> str:
    out = subprocess.run([str(bin_dir / "rccs"), "version"], capture_output=True, text=True, check=True,
                         env=_no_compiler_env())
    return out.stdout.strip()


def _source_version() -> str:
    match = re.search(r'__version__ = "([^"]+)"', (REPO / "rccs" / "__init__.py").read_text())
    assert match is not None
    return match.group(1)


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


def test_the_wheel_is_manylinux_lean_and_licensed():
    wheel = _one("rccs-*.whl")
    assert "manylinux" in wheel.name, wheel.name
    version = _source_version()
    assert wheel.name.startswith(f"rccs-{version}-"), (wheel.name, version)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert not [name for name in names if name.endswith(".c")
                    or (name.startswith("rccs/_fastpath/") and name.endswith(".html"))]
        # the web console's built files (rccs/console, committed) are package data
        assert {f"rccs/console/{name}" for name in CONSOLE_FILES} <= set(names)
        assert f"rccs-{version}.dist-info/licenses/LICENSE" in names
        assert any(name.startswith("rccs/broker/") for name in names)  # every package, found, not listed
        modules = [name for name in names if name.startswith("rccs/_fastpath/_") and name.endswith(".so")]
        assert len(modules) == 4, modules
        metadata = archive.read(f"rccs-{version}.dist-info/METADATA").decode()
        assert f"Version: {version}" in metadata and "License-Expression: MIT" in metadata
        extract = DIST.parent / "build" / "wheel-check"
        shutil.rmtree(extract, ignore_errors=True)
        archive.extractall(extract, modules)
    for module in modules:
        sections = subprocess.run(["readelf", "-S", "-W", str(extract / module)], capture_output=True, text=True,
                                  check=True).stdout
        assert ".debug_info" not in sections, f"{module} carries debug info"


async def test_the_wheel_installs_without_a_compiler_and_serves_compiled(tmp_path):
    wheel = _one("rccs-*.whl")
    bin_dir = _venv(tmp_path / "venv")
    subprocess.run([str(bin_dir / "pip"), "install", "--quiet", "--only-binary", ":all:", str(wheel)], check=True,
                   env=_no_compiler_env())
    assert _version_line(bin_dir) == f"rccs {_source_version()} (fastpath: cython)"
    server = ServerProcess(tmp_path / "data", "--log-level", "INFO", command=[str(bin_dir / "rccs")],
                           env={**_no_compiler_env(), "RCCS_TOKEN_SECRET": "wheel-check-secret-of-at-least-32-bytes"})
    await server.start()
    try:
        assert server.implementation == "cython"
        tokens = TokenAuthority(b"wheel-check-secret-of-at-least-32-bytes")
        phone = Client(server.ws_url, tokens.issue("alice", "phone", 600), {"type": "mobile"})
        laptop = Client(server.ws_url, tokens.issue("alice", "laptop", 600), {"type": "desktop"})
        await phone.connect()
        await laptop.connect()
        receipts, message = await asyncio.gather(
            phone.send({"device": "laptop"}, "note", {"text": "from the wheel"}, ack=True, timeout=10),
            laptop.next_message(timeout=10))
        assert message.body == {"text": "from the wheel"}
        assert [(r.status, r.device) for r in receipts] == [("delivered", "laptop")]
        # the web console is served from the installed package
        for name in CONSOLE_FILES:
            status, body = await asyncio.to_thread(_get, f"{server.http_url}/console/{name}")
            assert (status, body) == (200, (REPO / "rccs" / "console" / name).read_bytes()), name
        await phone.close()
        await laptop.close()
    finally:
        server.kill()


def test_the_sdist_builds_and_installs_compiled(tmp_path):
    sdist = _one("rccs-*.tar.gz")
    bin_dir = _venv(tmp_path / "venv")
    env = {name: value for name, value in os.environ.items() if not name.startswith("RCCS_")}
    subprocess.run([str(bin_dir / "pip"), "install", "--quiet", str(sdist)], check=True, env=env)
    assert _version_line(bin_dir) == f"rccs {_source_version()} (fastpath: cython)"


def test_the_systemd_unit_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here: the unit is not verified")
    bin_dir = _venv(tmp_path / "venv")  # the unit's ExecStart must name an executable that exists
    executable = bin_dir / "rccs"
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    text = UNIT.read_text()
    assert "/opt/rccs/bin/rccs serve" in text
    for line in ("User=rccs", "Restart=on-failure", "KillSignal=SIGTERM", "TimeoutStopSec=45", "--drain-timeout 30"):
        assert line in text, line
    unit = tmp_path / "rccs.service"
    unit.write_text(text.replace("/opt/rccs/bin/rccs", str(executable)))
    verified = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr
