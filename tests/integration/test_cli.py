"""The ``rccs`` command line, run as a real process."""

import asyncio
import signal
import subprocess
import sys

from rccs import _fastpath
from rccs.auth import TokenAuthority, load_or_create_secret
from rccs.client import Client
from rccs.testing import ServerProcess, child_environment


def rccs(*args):
    return subprocess.run([sys.executable, "-m", "rccs", *args], capture_output=True, text=True, timeout=60,
                          env=child_environment())


def test_token_issue_prints_a_token_the_server_accepts(tmp_path):
    result = rccs("token", "issue", "--user", "alice", "--device", "alice-phone", "--ttl", "1h",
                  "--data-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    identity = TokenAuthority(load_or_create_secret(str(tmp_path))).verify(token)
    assert (identity.user, identity.device) == ("alice", "alice-phone")


def test_token_issue_rejects_bad_input(tmp_path):
    result = rccs("token", "issue", "--user", "al ice", "--device", "d", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "invalid user id" in result.stderr
    result = rccs("token", "issue", "--user", "alice", "--device", "d", "--ttl", "soon", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "invalid duration" in result.stderr


def test_version_names_the_fast_path():
    result = rccs("version")
    assert result.returncode == 0
    assert f"fastpath: {_fastpath.IMPLEMENTATION}" in result.stdout


async def test_serve_logs_its_fast_path_serves_and_drains_on_sigterm(tmp_path):
    data_dir = tmp_path / "data"
    server = ServerProcess(data_dir, env=child_environment(RCCS_HEARTBEAT="15"))
    try:
        await server.start()  # it logged "fastpath=... listening on ..."
        assert server.implementation == _fastpath.IMPLEMENTATION
        token = rccs("token", "issue", "--user", "u", "--device", "u-1", "--data-dir", str(data_dir)).stdout.strip()
        client = Client(server.ws_url, token, {"type": "desktop"}, reconnect=False)
        welcome = await client.connect()
        assert welcome["heartbeat"] == 15.0
        assert await client.ping() > 0
        server.send_signal(signal.SIGTERM)
        closed = await asyncio.wait_for(client.closed, 10)
        assert closed.code == 1001
        assert await asyncio.to_thread(server.wait, 10) == 0
    finally:
        server.kill()


def test_serve_refuses_a_bad_config(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("port = 'eighty'\n")
    result = rccs("serve", "--config", str(config))
    assert result.returncode == 2
    assert "port" in result.stderr
