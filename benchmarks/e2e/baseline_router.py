"""Baseline router: the least a WebSocket router can do on uvloop + picows.

Every accepted connection gets a number, sent to it once as a 4-byte
little-endian frame. After that, each binary frame must start with the
4-byte number of its target connection; the router forwards the whole
payload, unchanged and undecoded, to that connection. Frames naming an
unknown connection are dropped.

This is the floor rccs is compared against in ``run.py``: same event loop,
same WebSocket library, one dict lookup and one ``send`` per message.

With ``--welcome`` it is instead the floor of a connect: it answers the first
frame of every connection (the ``hello``, not even decoded) with a fixed
msgpack ``{"op": "welcome"}`` and ignores the rest. ``scale.py connect`` opens
its storm against it to show how many connects per second the generator itself
can make on this machine.

    python benchmarks/e2e/baseline_router.py --port 9000 [--welcome]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal

import msgpack
import uvloop
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

_BINARY = WSMsgType.BINARY
_CLOSE = WSMsgType.CLOSE


_WELCOME = msgpack.packb({"op": "welcome"})


class Router:
    def __init__(self, welcome: bool = False) -> None:
        self.connections: dict[int, WSTransport] = {}
        self._numbers = itertools.count()
        self.welcome = welcome

    def listener(self, _request: object) -> WSListener:
        if self.welcome:
            return WelcomeConnection(self, next(self._numbers))
        return RouterConnection(self, next(self._numbers))


class RouterConnection(WSListener):
    def __init__(self, router: Router, number: int):
        super().__init__()
        self.router = router
        self.number = number
        self.connections = router.connections

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.connections[self.number] = transport
        transport.send(_BINARY, self.number.to_bytes(4, "little"))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is _BINARY:
            # picows copies the payload into its write buffer inside send(), so a
            # view of the read buffer is safe here and avoids one more copy.
            payload = frame.get_payload_as_memoryview()
            target = self.connections.get(int.from_bytes(payload[:4], "little"))
            if target is not None:
                target.send(_BINARY, payload)
        elif frame.msg_type is _CLOSE:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.connections.pop(self.number, None)


class WelcomeConnection(RouterConnection):
    """``--welcome``: the first frame is answered with a welcome; nothing else is routed."""

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.connections[self.number] = transport
        self.welcomed = False

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is _CLOSE:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
        elif not self.welcomed:
            self.welcomed = True
            transport.send(_BINARY, _WELCOME)


async def serve(host: str, port: int, welcome: bool) -> None:
    router = Router(welcome)
    server = await ws_create_server(router.listener, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()
    for transport in list(router.connections.values()):
        transport.send_close(WSCloseCode.GOING_AWAY)
        transport.disconnect()
    await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--welcome", action="store_true", help="answer each connection's first frame with a welcome")
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.welcome))


if __name__ == "__main__":
    main()
