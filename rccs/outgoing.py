"""One ``msg`` being written to its receivers: its frame built lazily, once per encoding."""

from __future__ import annotations

from typing import Any

from ._fastpath import encode_msg_prefix
from .clock import now_ms
from .protocol import json_dumps, json_value_to_msgpack, msgpack_body_to_json_value


class Outgoing:
    """A message's body in whichever encodings receivers need; each receiver appends its own ``seq``."""

    __slots__ = ("ack", "app_type", "body_json", "body_raw", "from_json", "json_prefix", "msg_id",
                 "msgpack_prefix", "sender", "ts")

    def __init__(self, msg_id: str | int, sender: str, app_type: str, ack: bool,
                 body_raw: bytes | None, body_json: Any, from_json: bool, ts: int | None = None):
        self.msg_id = msg_id
        self.sender = sender
        self.app_type = app_type
        self.ack = ack
        self.ts = now_ms() if ts is None else ts
        self.body_raw = body_raw
        self.body_json = body_json
        self.from_json = from_json
        self.msgpack_prefix: bytes | None = None
        self.json_prefix: bytes | None = None

    def msgpack_frame_prefix(self) -> bytes:
        if self.msgpack_prefix is None:
            if self.body_raw is None:
                self.body_raw = json_value_to_msgpack(self.body_json)
            self.msgpack_prefix = encode_msg_prefix(
                self.msg_id, self.sender, self.app_type, self.body_raw, self.ts, self.ack
            )
        return self.msgpack_prefix

    def json_frame_prefix(self) -> bytes:
        if self.json_prefix is None:
            if not self.from_json:
                assert self.body_raw is not None
                self.body_json = msgpack_body_to_json_value(self.body_raw)
            head = {"op": "msg", "id": self.msg_id, "from": self.sender, "type": self.app_type,
                    "body": self.body_json, "ts": self.ts, "ack": self.ack}
            self.json_prefix = json_dumps(head)[:-1] + b',"seq":'
        return self.json_prefix
