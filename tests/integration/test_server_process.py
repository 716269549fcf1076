"""``rccs.testing.ServerProcess``, which the crash, drain, log, CLI, state and handoff tests start
``rccs serve`` with: the child runs the fast path the suite runs, and a chosen port that another process
took before the child could bind it costs a retry, not a failed test."""

import asyncio
import importlib.util
import re
import socket
import urllib.request

import pytest

from rccs import _fastpath
from rccs.testing import ServerProcess, child_environment, free_ports


def get(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        return str(response.read().decode())


async def test_the_server_process_runs_the_fast_path_of_the_suite(tmp_path):
    server = ServerProcess(tmp_path / "data")
    try:
        await server.start()
        assert server.implementation == _fastpath.IMPLEMENTATION  # from its startup line
        # and from /metrics: rccs_info{implementation=...,version=...} 1.0
        metrics = await asyncio.to_thread(get, server.http_url + "/metrics")
        (info,) = [line for line in metrics.splitlines() if line.startswith("rccs_info{")]
        assert re.search(rf'implementation="{_fastpath.IMPLEMENTATION}"', info), info
    finally:
        server.kill()


async def test_start_refuses_a_child_that_runs_the_other_fast_path(tmp_path):
    env = child_environment()
    if _fastpath.IMPLEMENTATION == "cython":
        env["RCCS_PUREPYTHON"] = "1"
    elif importlib.util.find_spec("rccs._fastpath._codec") is None:
        pytest.skip("the compiled fast path is not built")
    else:
        env.pop("RCCS_PUREPYTHON", None)
    server = ServerProcess(tmp_path / "data", env=env)
    try:
        with pytest.raises(AssertionError, match="fast path"):
            await server.start()
        assert not server.running()
    finally:
        server.kill()


@pytest.mark.parametrize("taken", ["websocket", "http"])
async def test_a_chosen_port_that_another_process_took_costs_a_retry(tmp_path, taken):
    with socket.socket() as other_process:
        other_process.bind(("127.0.0.1", 0))
        other_process.listen()
        taken_port = other_process.getsockname()[1]
        (free,) = free_ports(1)
        first_choice = [taken_port, free] if taken == "websocket" else [free, taken_port]
        choices = iter([first_choice])
        server = ServerProcess(tmp_path / "data", choose_ports=lambda: next(choices, None) or free_ports(2))
        try:
            await server.start()
            assert server.processes >= 2
            assert "address already in use" in (tmp_path / "server-1.log").read_text().lower()
            assert f":{taken_port}" not in server.ws_url + server.http_url
            assert "rccs_info{" in await asyncio.to_thread(get, server.http_url + "/metrics")  # ours answers
        finally:
            server.kill()


async def test_a_server_that_fails_for_another_reason_is_not_started_again(tmp_path):
    server = ServerProcess(tmp_path / "data", "--log-level", "loud")
    with pytest.raises(AssertionError, match="exited with 2"):
        await server.start()
    assert server.processes == 1
    assert "log_level" in server.logs()
