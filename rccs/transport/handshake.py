"""The WebSocket port's listening server, with a guard in front of picows for the HTTP upgrade request.

picows reads the upgrade request itself and, when its head reaches 16 KiB, drops the connection without an
HTTP answer; a client still writing a larger head then sees a TCP reset, not a refusal it can report. So each
connection starts with a :class:`HandshakeGuard` as its protocol. The guard collects the request head (the
request line and headers, up to and including the empty line that ends them):

- a head of at most :data:`MAX_HANDSHAKE_HEAD_BYTES` is handed, with whatever followed it, to a fresh picows
  protocol, which becomes the transport's protocol (``transport.set_protocol``) before it sees a byte. picows
  then answers the upgrade as before, and from then on the guard is out of the path: frames go from the
  transport straight to picows.
- a longer head is answered ``431 Request Header Fields Too Large`` with ``Connection: close`` by the guard,
  which then closes gently: it half-closes, reads and discards what is still coming, and closes on the
  client's EOF (or cuts the connection off after :data:`DRAIN_SECONDS` or :data:`DRAIN_MAX_BYTES`);
- a head not complete within the handshake timeout (``hello_timeout``) is answered ``408 Request Timeout``
  the same way, or, when not one byte of it arrived, the connection is just closed.

The limit is within picows' own (see :data:`MAX_HANDSHAKE_HEAD_BYTES`), so picows' check never fires: no
head over it reaches picows, and none within it is one picows would drop.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any

from picows import WSAutoPingStrategy
from picows.picows import WSProtocol  # type: ignore[attr-defined]

from .linger import DRAIN_MAX_BYTES, DRAIN_SECONDS

aiofastnet: ModuleType | None
try:  # what picows serves on when it is installed (it comes with picows)
    aiofastnet = importlib.import_module("aiofastnet")
except ImportError:  # then the loop's own transports, as picows does
    aiofastnet = None

log = logging.getLogger("rccs.handshake")

# picows refuses a head whose request line and headers reach 16 KiB; counting the final empty line in, the
# largest head it takes is 16 KiB + 3 bytes. rccs' limit, a round 16 KiB with the empty line, stays within it.
MAX_HANDSHAKE_HEAD_BYTES = 16 * 1024

_HEAD_END = b"\r\n\r\n"


def _refusal(status: str, text: str) -> bytes:
    body = f"{text}\n".encode()
    return (f"HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


HEAD_TOO_LARGE = _refusal(
    "431 Request Header Fields Too Large",
    f"the request line and headers exceed {MAX_HANDSHAKE_HEAD_BYTES} bytes")
HEAD_TOO_SLOW = _refusal("408 Request Timeout", "the upgrade request did not arrive in time")


class HandshakeGuard(asyncio.Protocol):
    """A connection's protocol until its upgrade request's head is complete (see the module's docstring)."""

    __slots__ = ("_discarded", "_head", "_on_refused", "_refused", "_timeout", "_timer", "_transport",
                 "_ws_protocol_factory")

    def __init__(self, ws_protocol_factory: Callable[[], asyncio.BaseProtocol], timeout: float | None,
                 on_refused: Callable[[str], None]):
        self._ws_protocol_factory = ws_protocol_factory
        self._timeout = timeout
        self._on_refused = on_refused  # told "upgrade_head_too_large" or "upgrade_head_too_slow" (counted)
        self._transport: Any = None
        self._head = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False  # answered 431 or 408: from then on, what arrives is discarded
        self._discarded = 0

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        if self._timeout is not None:
            self._timer = asyncio.get_running_loop().call_later(self._timeout, self._too_slow)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._discarded += len(data)
            if self._discarded > DRAIN_MAX_BYTES:
                self._cut_off()
            return
        received: bytes | bytearray = data
        searched_up_to = 0
        if self._head:  # the head came in pieces: the end may straddle them
            searched_up_to = len(self._head) - len(_HEAD_END) + 1
            self._head += data
            received = self._head
        end = received.find(_HEAD_END, max(0, searched_up_to))
        if end >= 0 and end + len(_HEAD_END) <= MAX_HANDSHAKE_HEAD_BYTES:
            self._hand_over(received)
        elif end >= 0 or len(received) >= MAX_HANDSHAKE_HEAD_BYTES:
            log.info("refused an upgrade request from %s: its head exceeds %d bytes",
                     self._transport.get_extra_info("peername"), MAX_HANDSHAKE_HEAD_BYTES)
            self._on_refused("upgrade_head_too_large")
            self._refuse(HEAD_TOO_LARGE)
        elif not self._head:
            self._head = bytearray(data)

    def eof_received(self) -> bool:
        # The client has sent everything (after a refusal: nothing unread is left to cause a reset), or
        # hung up in the middle of its head.
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None

    def _hand_over(self, received: bytes | bytearray) -> None:
        """Make picows' protocol the transport's and give it the head and what followed."""
        if self._timer is not None:
            self._timer.cancel()
        transport = self._transport
        self._transport = None
        self._head = bytearray()
        ws_protocol: Any = self._ws_protocol_factory()
        transport.set_protocol(ws_protocol)  # before picows runs: what it does on the transport finds itself
        ws_protocol.connection_made(transport)
        offset = 0
        while offset < len(received) and not transport.is_closing():  # picows' buffer grows as it fills
            buffer = ws_protocol.get_buffer(-1)
            count = min(len(buffer), len(received) - offset)
            buffer[:count] = received[offset:offset + count]
            offset += count
            ws_protocol.buffer_updated(count)

    def _refuse(self, answer: bytes) -> None:
        self._refused = True
        self._head = bytearray()
        transport = self._transport
        transport.write(answer)
        if transport.can_write_eof():  # not over TLS: there the answer is all the client gets
            transport.write_eof()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(DRAIN_SECONDS, self._cut_off)

    def _too_slow(self) -> None:
        self._timer = None
        if self._transport.is_closing():  # the client hung up; the transport is on its way out
            return
        if self._head:
            log.info("refused an upgrade request from %s: its head did not arrive within %s s",
                     self._transport.get_extra_info("peername"), self._timeout)
            self._on_refused("upgrade_head_too_slow")
            self._refuse(HEAD_TOO_SLOW)
        else:
            self._transport.close()

    def _cut_off(self) -> None:
        """The refused client kept sending, or neither sent EOF nor closed, for too long: drop it."""
        if self._transport is not None:
            self._transport.abort()


async def create_ws_server(listener_factory: Callable[[Any], Any], host: str | None, port: int | None, *,
                           max_frame_size: int, read_buffer_init_size: int, websocket_handshake_timeout: float,
                           auto_ping_idle_timeout: float, auto_ping_reply_timeout: float, logger_name: str,
                           backlog: int, on_refused: Callable[[str], None], use_aiofastnet: bool = True,
                           **server_options: Any) -> asyncio.Server:
    """What ``picows.ws_create_server`` builds (auto-ping when idle, auto-pong), each connection behind a guard.

    ``on_refused`` is told why an upgrade request was refused (431 or 408). ``use_aiofastnet``: False for
    uvloop's own transport (setting ``socket_transport``). ``server_options`` go to the
    loop's (or aiofastnet's) ``create_server``: ``ssl`` and ``ssl_handshake_timeout``.
    """
    logger = logging.getLogger(f"picows.{logger_name}")  # the name picows gives a logger_name

    def ws_protocol() -> asyncio.BaseProtocol:
        protocol: asyncio.BaseProtocol = WSProtocol(
            None, None, False,  # no host or path of our own (a client's), server side
            listener_factory, logger,
            True,  # disconnect_on_exception
            # No handshake timer of picows' own (one costs ~5 us to set and cancel): the guard has timed the
            # head, and picows, given a complete head, answers it within the call that hands it over.
            None,
            True, auto_ping_idle_timeout, auto_ping_reply_timeout, WSAutoPingStrategy.PING_WHEN_IDLE,
            True,  # enable_auto_pong
            max_frame_size,
            None,  # extra_headers (a client's)
            read_buffer_init_size,
        )
        return protocol

    def guard() -> HandshakeGuard:
        return HandshakeGuard(ws_protocol, websocket_handshake_timeout, on_refused)

    loop = asyncio.get_running_loop()
    # aiofastnet's transport (picows' default) unless the operator chose uvloop's own (socket_transport)
    create_server = (partial(aiofastnet.create_server, loop) if use_aiofastnet and aiofastnet is not None
                     else loop.create_server)
    server: asyncio.Server = await create_server(guard, host, port, backlog=backlog, **server_options)
    return server
