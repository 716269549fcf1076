"""The ``rccs`` command line, run as a real process."""

import asyncio
import os
import signal
import subprocess
import sys

import pytest

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


def test_version_flag_prints_what_the_version_command_prints():
    result = rccs("--version")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == rccs("version").stdout
    assert result.stdout.startswith("rccs ")


# ---- failures the operator's environment causes: one line on stderr, no traceback -------------------
# (a port in use: test_logs.py::test_serve_logs_a_failure_to_start_as_one_json_line)


@pytest.mark.parametrize("flag", ["--port", "--http-port"])
def test_serve_refuses_a_port_out_of_range(tmp_path, flag):
    result = rccs("serve", flag, "99999", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    setting = flag.removeprefix("--").replace("-", "_")
    assert result.stderr == f"rccs: error: setting '{setting}' must be a TCP port, 0-65535 (got 99999)\n"


def test_token_issue_with_a_data_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "a-file").write_text("not a directory\n")
    data_dir = tmp_path / "a-file" / "data"
    result = rccs("token", "issue", "--user", "alice", "--device", "alice-phone", "--data-dir", str(data_dir))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"rccs: error: Not a directory: {data_dir}\n"


def test_a_reader_that_stops_early_ends_a_listing_quietly(tmp_path):
    data_dir = str(tmp_path / "data")
    assert rccs("users", "add", "alice", "--device", "alice-phone", "--data-dir", data_dir).returncode == 0
    # 'rccs devices list | head -1' where head has exited already: a pipe without a reader, made before the
    # child starts, so that its first write is sure to fail.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        listing = subprocess.run([sys.executable, "-m", "rccs", "devices", "list", "--data-dir", data_dir],
                                 stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
                                 env=child_environment())
    finally:
        os.close(write_end)
    assert listing.stderr == ""
    assert listing.returncode == 128 + signal.SIGPIPE  # what a shell reports for 'ls | head -1' under pipefail


async def test_a_second_server_on_one_data_directory_refuses_to_start_and_names_redis(tmp_path):
    data_dir = tmp_path / "data"
    first = ServerProcess(data_dir)
    await first.start()
    try:
        second = await asyncio.to_thread(rccs, "serve", "--data-dir", str(data_dir), "--port", "0", "--http-port", "0")
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "another rccs server is serving the data directory" in lines[0]
        assert "--store redis://" in lines[0]
        assert first.running()
    finally:
        first.kill()
    # The lock goes with the process, however it ends: the directory serves again.
    again = ServerProcess(data_dir)
    await again.start()
    again.kill()
