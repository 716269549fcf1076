"""picows listener: turns WebSocket frames into whole messages for a Session.

picows hands over raw frames (its ``WSFrame`` is only valid inside
``on_ws_frame``), so this layer copies payloads, reassembles fragmented
messages up to ``max_message_bytes``, answers CLOSE frames, and implements
the session's ``Sink``.
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


class ServerConnection(WSListener):
    """One accepted WebSocket connection; the Sink of its Session."""

    def __init__(self, hub: Hub):
        super().__init__()
        self.hub = hub
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
        if transport is not None and not transport.is_close_frame_sent:
            transport.send(_TEXT if text else _BINARY, data)

    def close(self, code: int, reason: str) -> None:
        transport = self.transport
        if transport is None:
            return
        if not transport.is_close_frame_sent:
            transport.send_close(int(code), reason.encode("utf-8")[:123])  # type: ignore[arg-type]
        transport.disconnect()
        if self.session is not None:
            self.session.on_closed()

    def hello_done(self) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
