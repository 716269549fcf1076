"""A real rccs server for the JavaScript client's tests (clients/js/test), on free ports, driven over stdin.

    python tests/js_server.py [--setting value ...]

Prints one JSON line ``{"ws_url": .., "http_url": ..}`` once the server listens, then answers one JSON line
per command line read from stdin (``{"id": n, "cmd": .., ...}`` -> ``{"id": n, "result": ..}`` or
``{"id": n, "error": ".."}``). Commands:

- ``token`` (user, device): a dev token;
- ``code`` (user, approve?): a pairing code made as ``rccs users add`` makes it (the user is added if missing);
- ``drop`` (user, device): close the device's connection with 1011, as a lost connection;
- ``pending`` (user, device): how many messages wait for the device's ack;
- ``retry`` (past_ms): run the retry sweep as if ``past_ms`` had passed (unacked messages are written again);
- ``py_connect`` (user, device, encoding, type): a device running the repo's Python client; it answers calls
  of ``py.echo`` with their params;
- ``py_send`` (device, to, type, body, ack): that device sends; the result lists its receipts;
- ``py_next`` (device, timeout): the next message that device took (``{from, id, type, body}``);
- ``py_call`` (device, to, method, params): that device calls a method; the result is the call's result;
- ``py_close`` (device).

Standard input closed: the server stops and the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from rccs import admin
from rccs.client import Client
from rccs.errors import CloseCode
from rccs.hub import now_ms
from rccs.testing import running_server


def _settings(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ack-timeout", dest="ack_timeout", type=float)
    parser.add_argument("--max-delivery-attempts", dest="max_delivery_attempts", type=int)
    parser.add_argument("--session-grace", dest="session_grace", type=float)
    parser.add_argument("--handoff-prepare-timeout", dest="handoff_prepare_timeout", type=float)
    parser.add_argument("--handoff-accept-timeout", dest="handoff_accept_timeout", type=float)
    args = parser.parse_args(argv)
    return {name: value for name, value in vars(args).items() if value is not None}


async def _lines() -> Any:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        yield line


def _reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def main(argv: list[str]) -> None:
    async with running_server(**_settings(argv)) as server:
        hub = server.hub
        python_devices: dict[str, Client] = {}

        async def run(command: dict[str, Any]) -> Any:
            cmd = command["cmd"]
            if cmd == "token":
                return server.issue_token(command["user"], command["device"])
            if cmd == "code":
                if await hub.store.get_user(command["user"]) is None:
                    await admin.add_user(hub.store, command["user"], now_ms())
                code = await admin.create_pairing_code(hub.store, command["user"], ttl_seconds=300,
                                                       approve=bool(command.get("approve")), now=now_ms())
                return code["code"]
            if cmd == "drop":
                session = hub.online(command["user"], command["device"])
                assert session is not None, "the device is not connected"
                session.close(CloseCode.INTERNAL_ERROR, "injected")
                return None
            if cmd == "pending":
                session = hub.online(command["user"], command["device"])
                return 0 if session is None else len(session.pending)
            if cmd == "retry":
                start = now_ms()
                hub.deliveries.retry_due(start)  # the sweep notes the deadline
                hub.deliveries.retry_due(start + int(command["past_ms"]))
                return None
            if cmd == "py_connect":
                device = command["device"]
                client = Client(server.ws_url, server.issue_token(command["user"], device),
                                {"type": command.get("type", "desktop")}, encoding=command.get("encoding", "msgpack"))
                client.handle("py.echo", lambda params: params)
                welcome = await client.connect()
                python_devices[device] = client
                return welcome
            if cmd == "py_send":
                client = python_devices[command["device"]]
                receipts = await client.send(command["to"], command["type"], command.get("body"),
                                             ack=bool(command.get("ack")))
                return [{"status": r.status, "device": r.device} for r in receipts]
            if cmd == "py_next":
                message = await python_devices[command["device"]].next_message(timeout=command.get("timeout", 10))
                return {"from": message.sender, "id": message.id, "type": message.type, "body": message.body}
            if cmd == "py_call":
                return await python_devices[command["device"]].call(command["to"], command["method"],
                                                                    command.get("params"), timeout=10)
            if cmd == "py_close":
                await python_devices.pop(command["device"]).close()
                return None
            raise ValueError(f"unknown command {cmd!r}")

        async def answer(command: dict[str, Any]) -> None:
            try:
                _reply({"id": command.get("id"), "result": await run(command)})
            except Exception as exc:  # reported to the test, which fails with it
                _reply({"id": command.get("id"), "error": f"{type(exc).__name__}: {exc}"})

        _reply({"ws_url": server.ws_url, "http_url": server.http_url})
        tasks = set()
        async for line in _lines():
            task = asyncio.create_task(answer(json.loads(line)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        for client in python_devices.values():
            await client.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
