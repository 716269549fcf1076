"""picows listener: turns WebSocket frames into whole messages for a Session.

picows hands over raw frames (its ``WSFrame`` is only valid inside
``on_ws_frame``), so this layer copies payloads, reassembles fragmented
messages up to ``max_message_bytes``, answers CLOSE frames, and implements
the session's ``Sink``.

Write coalescing: outgoing data frames are not written one by one. Each
connection collects the frames produced during one event-loop iteration and
a single ``call_soon`` callback writes every connection's batch with one
``writelines`` (one send syscall per connection per iteration instead of one
per message). Server frames are unmasked, so framing them here is a header
of 2, 4 or 10 bytes. Control frames (close, pong) still go through picows;
a connection's batch is flushed before its close frame so order is kept.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from picows import WSFrame, WSListener, WSMsgType, WSTransport

from ..errors import CloseCode
from ..session import Session

if TYPE_CHECKING:
    from ..hub import Hub

log = logging.getLogger("rccs.transport")

_BINARY = WSMsgType.BINARY
_TEXT = WSMsgType.TEXT
_CONTINUATION = WSMsgType.CONTINUATION
_CLOSE = WSMsgType.CLOSE

_FIN_TEXT = 0x81
_FIN_BINARY = 0x82
# Headers of unmasked final frames shorter than 126 bytes, by length.
_SHORT_TEXT_HEADERS = [bytes((_FIN_TEXT, n)) for n in range(126)]
_SHORT_BINARY_HEADERS = [bytes((_FIN_BINARY, n)) for n in range(126)]


def frame_header(length: int, text: bool) -> bytes:
    """RFC 6455 header of an unmasked, final text or binary frame carrying ``length`` bytes."""
    if length < 126:
        return (_SHORT_TEXT_HEADERS if text else _SHORT_BINARY_HEADERS)[length]
    first = _FIN_TEXT if text else _FIN_BINARY
    if length < 65536:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")


class WriteCoalescer:
    """Flushes every connection that queued frames during this loop iteration, once."""

    def __init__(self) -> None:
        self._dirty: list[ServerConnection] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def schedule(self, connection: ServerConnection) -> None:
        if not self._dirty:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self.flush)
        self._dirty.append(connection)

    def flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for connection in dirty:
            connection.flush()


class ServerConnection(WSListener):
    """One accepted WebSocket connection; the Sink of its Session."""

    def __init__(self, hub: Hub, coalescer: WriteCoalescer):
        super().__init__()
        self.hub = hub
        self.coalescer = coalescer
        self._outbox: list[bytes] | None = None
        self.transport: WSTransport | None = None
        self.session: Session | None = None
        self.peer = "?"
        self._fragments: bytearray | None = None
        self._fragments_text = False
        self._hello_timer: asyncio.TimerHandle | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        peername = transport.underlying_transport.get_extra_info("peername")
        if peername:
            self.peer = f"{peername[0]}:{peername[1]}"
        hub = self.hub
        if hub.is_full() or not hub.accepting:
            code = CloseCode.TRY_AGAIN_LATER if hub.accepting else CloseCode.GOING_AWAY
            hub.closes_sent[int(code)] += 1
            transport.send_close(int(code), b"server full" if hub.accepting else b"shutting down")  # type: ignore[arg-type]
            transport.disconnect()
            return
        self.session = Session(hub, self)
        self._hello_timer = asyncio.get_running_loop().call_later(
            hub.settings.hello_timeout, self.session.on_hello_timeout
        )

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        session = self.session
        if session is None or transport.is_close_frame_sent:
            # picows keeps parsing after it refused an oversized frame and may
            # still deliver that frame; nothing is accepted once we are closing.
            return
        msg_type = frame.msg_type
        if msg_type in (_BINARY, _TEXT):
            if self._fragments is not None:
                self.close(CloseCode.PROTOCOL_ERROR, "new message inside a fragmented message")
                return
            if frame.fin:
                session.on_frame(frame.get_payload_as_bytes(), msg_type == _TEXT)
            else:
                self._fragments = bytearray(frame.get_payload_as_memoryview())
                self._fragments_text = msg_type == _TEXT
        elif msg_type == _CONTINUATION:
            fragments = self._fragments
            if fragments is None:
                self.close(CloseCode.PROTOCOL_ERROR, "continuation frame without a message")
                return
            if len(fragments) + frame.payload_size > self.hub.settings.max_message_bytes:
                self.close(CloseCode.MESSAGE_TOO_BIG, "message too big")
                return
            fragments += frame.get_payload_as_memoryview()
            if frame.fin:
                self._fragments = None
                session.on_frame(bytes(fragments), self._fragments_text)
        elif msg_type == _CLOSE:
            if not transport.is_close_frame_sent:
                transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        if self.session is not None:
            self.session.on_closed()

    # ---- Sink ---------------------------------------------------------

    def send_frame(self, data: bytes, text: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_close_frame_sent:
            return
        outbox = self._outbox
        if outbox is None:
            self._outbox = [frame_header(len(data), text), data]
            self.coalescer.schedule(self)
        else:
            outbox.append(frame_header(len(data), text))
            outbox.append(data)

    def flush(self) -> None:
        """Write the frames queued since the last flush in one go."""
        outbox = self._outbox
        if outbox is None:
            return
        self._outbox = None
        transport = self.transport
        if transport is not None and not transport.is_disconnected and not transport.is_close_frame_sent:
            transport.underlying_transport.writelines(outbox)

    def close(self, code: int, reason: str) -> None:
        transport = self.transport
        if transport is None:
            return
        self.flush()
        if not transport.is_close_frame_sent:
            transport.send_close(int(code), reason.encode("utf-8")[:123])  # type: ignore[arg-type]
        transport.disconnect()
        if self.session is not None:
            self.session.on_closed()

    def hello_done(self) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
