"""A protocol fuzzer against a live ``rccs serve`` (a child process, so its log can be read).

While two witness devices of their own user keep sending each other ``ack: true`` messages, fuzz workers
throw at the server: every op of protocol.md with fields mutated to wrong types and sizes (also before
``hello``), malformed WebSocket frames from a raw socket, slow and broken handshakes, and garbage on both
ports. A run fails (a *finding*) on:

- a traceback in the server's log, or an ``internal`` error answered to anyone;
- a witness message or receipt that does not arrive in time;
- a ``msg`` reaching a device of another user;
- a WebSocket upgrade request whose head is over 16 KiB answered otherwise than 431 and an orderly close
  (a TCP reset included);
- the server process dying;
- the server's memory (RSS) growing by more than ``--rss-growth-mib`` after the warm-up.

Everything random comes from one seed (printed; ``--seed`` repeats a run's choices, though not the timing).
Run ``python tests/fuzz/protocol_fuzz.py --minutes 5`` or through tests/fuzz/run.py (``make fuzz``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import os
import random
import re
import secrets
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import msgpack

from rccs.auth import TokenAuthority
from rccs.client import Client, ReceiptTimeout
from rccs.testing import ServerProcess, child_environment
from rccs.transport.handshake import MAX_HANDSHAKE_HEAD_BYTES

FUZZ_USERS = 4
DEVICES_PER_USER = 3
WORKERS = 4
WITNESS_USER = "witness"
WITNESS_TIMEOUT = 15.0  # seconds for a witness message and its receipt, however busy the server is
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|\"exc_info\"|\bexc_text\b")

# A valid-looking envelope for every op a client may send (protocol.md); the fuzzer mutates them.
TEMPLATES: dict[str, dict[str, Any]] = {
    "hello": {"token": "", "device": {"type": "web", "name": "n", "capabilities": ["c"], "metadata": {"k": 1}},
              "resume": {"session": "s", "last_seq": 0}},
    "send": {"id": "m", "to": {"device": "D"}, "type": "t", "body": {"x": [1, 2]}, "ack": True, "ttl": 60,
             "priority": "HIGH", "durable": False, "first_ack": False},
    "ack": {"seq": 1},
    "ping": {"id": "p"},
    "devices": {"id": 1},
    "device.update": {"id": 2, "set": {"name": "x", "capabilities": ["a"], "metadata": {}}, "device": "D"},
    "presence.set": {"id": 3, "status": "away"},
    "device.revoke": {"id": 4, "device": "ghost-device"},
    "sessions": {"id": 5},
    "session.revoke": {"id": 6, "session": "no-such-session"},
    "refresh": {"id": 7, "token": "x"},
    "pair.create": {"id": 8, "approve": True, "ttl": 300},
    "pair.redeem": {"id": "r", "code": "7KQ2-M9XD", "device": {"type": "desktop"}},
    "pair.approve": {"id": 9, "request": "req"},
    "pair.deny": {"id": 10, "request": "req"},
    "call": {"id": "q", "to": {"device": "D"}, "method": "m", "params": {"a": 1}, "timeout": 1},
    "result": {"id": "q", "result": {"v": 1}, "error": {"code": "c", "message": "m"}},
    "state.get": {"id": "g", "doc": "user/doc"},
    "state.patch": {"id": "s", "doc": "user/doc", "patch": {"a": {"b": 1}}, "if_rev": 0, "patch_id": "pid"},
    "state.subscribe": {"id": "u", "doc": "user/doc", "since": 0},
    "state.unsubscribe": {"id": "v", "prefix": "user/"},
    "task.claim": {"id": "c", "task": "agent", "ttl": 5},
    "task.renew": {"id": "c", "task": "agent", "epoch": 1, "ttl": 5},
    "task.release": {"id": "c", "task": "agent", "epoch": 1},
    "task.list": {"id": "l", "task": "agent"},
    "handoff.request": {"id": "h", "task": "agent", "to": {"device": "D"}},
    "handoff.prepared": {"handoff": "h", "checkpoint": {"step": 1}},
    "handoff.refuse": {"handoff": "h", "reason": "no"},
    "handoff.accept": {"handoff": "h"},
    "handoff.reject": {"handoff": "h", "reason": "no"},
}
OPS = sorted(TEMPLATES)
FOREIGN_TOKENS = TokenAuthority(b"the secret of another server, 32 bytes")


@dataclass
class Findings:
    items: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, what: str) -> None:
        if len(self.items) < 200:
            self.items.append(what)
        print(f"FINDING: {what}", flush=True)

    def count(self, action: str) -> None:
        self.counts[action] = self.counts.get(action, 0) + 1


# ---- values of the wrong type and size ---------------------------------------------------------------------------

def odd_value(rng: random.Random, text: bool) -> Any:
    """A value that is wrong somewhere: a type no field expects there, a size over a limit, an edge number."""
    choices: list[Any] = [
        None, True, False, 0, -1, 1, 2**31, 2**53, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 1.5, -0.0, 1e308,
        "", "x", "x" * 128, "x" * 129, "x" * 257, "x" * rng.choice([4096, 70000]), "\u2603" * 100, "user/",
        "live/x", "device/other/x", [], [1, "a", None], ["a"] * 300, {}, {"device": "witness-a"},
        {"all": True, "pick": "one"}, {"type": "web", "self": True}, {"devices": ["witness-b", "x"]},
        nest(rng.randint(20, 40), rng.random() < 0.5), "../../etc", "7KQ2M9XD", "\x00",
        Raw(rng, text), Raw(rng, text), Raw(rng, text), [Raw(rng, text)], {"k": Raw(rng, text)},
    ]
    if not text:  # only msgpack carries these
        choices += [b"bin", msgpack.ExtType(rng.randint(0, 127), b"\x01\x02\x03"), float("nan"),
                    float("inf"), 2**64 - 1, {1: "int key"}]
    else:
        choices += [2**64, -(2**63) - 1, 10**30, 1e300]
    return rng.choice(choices)


def nest(depth: int, as_map: bool) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"k": value} if as_map else [value]
    return value


def mutate(rng: random.Random, envelope: dict[str, Any], text: bool, devices: list[str]) -> dict[str, Any]:
    out = dict(envelope)
    for key, value in list(out.items()):  # names of devices the fuzzer owns, or of other users
        if value == "D" or (isinstance(value, dict) and value.get("device") == "D"):
            target = rng.choice([*devices, "witness-a", "nobody"])
            out[key] = target if value == "D" else {**value, "device": target}
    for _ in range(rng.randint(0, 3)):
        keys = [k for k in out if k != "op"]
        action = rng.random()
        if keys and action < 0.45:
            key = rng.choice(keys)
            if isinstance(out[key], dict) and out[key] and rng.random() < 0.5:
                inner = dict(out[key])
                inner[rng.choice(list(inner))] = odd_value(rng, text)
                out[key] = inner
            else:
                out[key] = odd_value(rng, text)
        elif keys and action < 0.65:
            del out[rng.choice(keys)]
        elif action < 0.8:
            out[rng.choice(["id", "op", "body", "zzz", "seq", "to", "type"])] = odd_value(rng, text)
        else:
            out["op"] = rng.choice([rng.choice(OPS), odd_value(rng, text), "x" * 100, "Send", "send "])
    return out


class Raw:
    """Bytes spliced into an encoded envelope where this value stands: what the JSON and msgpack libraries
    would never write (1e999999, lone surrogates, ext type -128, odd timestamps, array keys, invalid UTF-8)."""

    JSON = ["1e999999", "-1e400", "NaN", "Infinity", '"\\ud800"', '"a\\udfffb"', '{"\\ud800":1}',
            "123456789012345678901234567890", "18446744073709551616", "-9223372036854775809", '"\\u0000"',
            "1E400", "0.1e-99999", '{"a":1,"a":2}']
    MSGPACK = [bytes.fromhex(h) for h in [
        "d48001", "c703ff010203", "c70cffffffffff0000000000000001", "d6ff00000001", "c70dff" + "00" * 13,
        "819101a161", "8181a16b01a161", "8201a161c3a162", "8201a161a131a162", "82c001cb7ff8000000000000c002",
        "a2fffe", "c4ff", "dbffffffff", "dfffffffff", "c1", "cb7ff0000000000000", "ca7fc00000", "cf" + "ff" * 8,
        "d3" + "80" + "00" * 7, "d8" + "05" + "00" * 16, "91" * 40 + "c0"]]

    def __init__(self, rng: random.Random, text: bool):
        self.data = rng.choice(self.JSON).encode() if text else rng.choice(self.MSGPACK)


def encode(envelope: Any, text: bool) -> bytes:
    """The envelope's bytes, with every Raw value spliced in."""
    spliced: list[bytes] = []

    def mark(value: Any) -> Any:
        if isinstance(value, Raw):
            spliced.append(value.data)
            return f"\x00raw{len(spliced) - 1}\x00"
        if isinstance(value, dict):
            return {key: mark(item) for key, item in value.items()}
        if isinstance(value, list):
            return [mark(item) for item in value]
        return value

    marked = mark(envelope)
    data = json.dumps(marked, allow_nan=False).encode() if text else msgpack.packb(marked, use_bin_type=True)
    for index, raw in enumerate(spliced):
        placeholder = f"\x00raw{index}\x00"
        data = data.replace(json.dumps(placeholder).encode() if text else msgpack.packb(placeholder), raw)
    return data


# ---- raw WebSocket ------------------------------------------------------------------------------------------------

def frame(payload: bytes, opcode: int, fin: bool = True, rsv: int = 0, masked: bool = True,
          length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if masked else 0
    if n < 126:
        header = bytes([first, mask_bit | n])
    elif n < 65536:
        header = bytes([first, mask_bit | 126]) + struct.pack("!H", n)
    else:
        header = bytes([first, mask_bit | 127]) + struct.pack("!Q", n)
    return header + (b"\0\0\0\0" if masked else b"") + payload


def upgrade_request(path: str, host: str, extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


class RawConnection:
    """A fuzz device's socket; a reader task checks what it is sent and drops it."""

    def __init__(self, fuzzer: Fuzzer, user: str, device: str, text: bool):
        self.fuzzer, self.user, self.device, self.text = fuzzer, user, device, text
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self.welcomed = asyncio.Event()
        self.closed = asyncio.Event()
        self.last_pong = asyncio.Event()
        self.revoked = False  # its hello was refused: the device was revoked
        # Answers must come in the order of the requests (section 2): the ids this connection gave its
        # requests, by position, and the position of the latest request answered so far.
        self.request_ids: dict[str, int] = {}
        self.answered = -1

    async def open(self, hello: bool) -> bool:
        url = urlparse(self.fuzzer.server.ws_url)
        try:
            self.reader, self.writer = await asyncio.open_connection(url.hostname, url.port)
            self.writer.write(upgrade_request(url.path, url.netloc))
            head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, asyncio.LimitOverrunError):
            return False
        if not head.startswith(b"HTTP/1.1 101"):
            self.fuzzer.findings.add(f"upgrade refused: {head[:80]!r}")
            return False
        self.task = asyncio.create_task(self._read())
        if hello:
            self.write(frame(encode({"op": "hello", "token": self.fuzzer.token(self.user, self.device),
                                     "device": {"type": "web"}}, self.text), 0x1 if self.text else 0x2))
            waits = [asyncio.ensure_future(self.welcomed.wait()), asyncio.ensure_future(self.closed.wait())]
            await asyncio.wait(waits, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
            if not self.welcomed.is_set():
                if self.revoked:  # a fuzzed device.revoke took it for good: the user gets a new device
                    self.fuzzer.replace_device(self.user, self.device)
                return False
        return True

    def write(self, data: bytes) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(data)

    async def _read(self) -> None:
        assert self.reader is not None
        try:
            while True:
                first, second = await self.reader.readexactly(2)
                length = second & 0x7F
                if length == 126:
                    (length,) = struct.unpack("!H", await self.reader.readexactly(2))
                elif length == 127:
                    (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
                payload = await self.reader.readexactly(length)
                opcode = first & 0x0F
                if opcode in (0x1, 0x2):
                    self._check(payload, opcode == 0x1)
                elif opcode == 0x8:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                    if code == 1011:
                        self.fuzzer.findings.add(f"{self.device}: closed with 1011 {payload[2:]!r}")
                    break
                elif opcode == 0x9:  # the server's heartbeat: answer like any client
                    self.write(frame(payload, 0xA))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed.set()

    def _check(self, payload: bytes, text: bool) -> None:
        try:
            envelope = json.loads(payload) if text else msgpack.unpackb(payload, strict_map_key=False)
        except ValueError as exc:
            self.fuzzer.findings.add(f"{self.device}: the server sent an undecodable frame ({exc}): {payload[:80]!r}")
            return
        op = envelope.get("op")
        answer_to = envelope.get("id")
        if op not in ("msg", "call") and isinstance(answer_to, str) and answer_to in self.request_ids:
            position = self.request_ids.pop(answer_to)
            if position < self.answered:
                self.fuzzer.findings.add(f"{self.device}: answer out of order: {envelope} after the answer to "
                                         f"request #{self.answered}")
            self.answered = position
        if op == "pong" and answer_to == "last":
            self.last_pong.set()
        if op == "welcome":
            self.welcomed.set()
        elif op == "msg":
            sender = envelope.get("from")
            owner = self.fuzzer.owner_of(sender)
            if owner is not None and owner != self.user:
                self.fuzzer.findings.add(f"cross-user delivery: {sender} ({owner}) -> {self.device} ({self.user})")
            if envelope.get("ack") is True and isinstance(envelope.get("seq"), int):
                self.write(frame(encode({"op": "ack", "seq": envelope["seq"]}, self.text),
                                 0x1 if self.text else 0x2))
        elif op == "error" and envelope.get("code") == "revoked":
            self.revoked = True
        elif op == "error" and envelope.get("code") == "internal":
            self.fuzzer.findings.add(f"{self.device}: internal error: {envelope}")

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # it ends however it ends
                await self.task


# ---- the fuzzer ---------------------------------------------------------------------------------------------------

class Fuzzer:
    def __init__(self, seed: int, workdir: Path, rss_growth_mib: int):
        self.seed = seed
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.rss_growth_mib = rss_growth_mib
        self.findings = Findings()
        self.secret = secrets.token_hex(32)
        self.tokens = TokenAuthority(self.secret.encode())
        self.admin_key = secrets.token_urlsafe(24)
        data_dir = workdir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        env = child_environment(RCCS_TOKEN_SECRET=self.secret, RCCS_ADMIN_KEY=self.admin_key,
                                RCCS_SESSION_GRACE="10", RCCS_HELLO_TIMEOUT="3")
        self.server = ServerProcess(data_dir, env=env)
        self.users = {f"fz{u}": [f"fz{u}-d{d}" for d in range(DEVICES_PER_USER)] for u in range(FUZZ_USERS)}
        self.users[WITNESS_USER] = ["witness-a", "witness-b"]
        self.device_owner = {device: user for user, devices in self.users.items() for device in devices}
        self.witnessed = 0
        self.inputs = 0
        self.request_counter = itertools.count()
        self.generations = itertools.count(1)

    def replace_device(self, user: str, device: str) -> None:
        devices = self.users[user]
        if device in devices:
            replacement = f"{device.split('.')[0]}.{next(self.generations)}"
            devices[devices.index(device)] = replacement
            self.device_owner[replacement] = user

    def token(self, user: str, device: str) -> str:
        return self.tokens.issue(user, device, 3600)

    def owner_of(self, device: Any) -> str | None:
        return self.device_owner.get(device) if isinstance(device, str) else None

    def rss_kib(self) -> int:
        assert self.server.proc is not None
        for line in Path(f"/proc/{self.server.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    # ---- witnesses ------------------------------------------------------------------------------------------

    async def witnesses(self, stop: asyncio.Event) -> None:
        """Two devices that keep sending each other ack:true messages; each must arrive and be delivered."""
        url = self.server.ws_url
        a = Client(url, self.token(WITNESS_USER, "witness-a"), {"type": "web"}, encoding="msgpack",
                   receipt_timeout=WITNESS_TIMEOUT)
        b = Client(url, self.token(WITNESS_USER, "witness-b"), {"type": "web"}, encoding="json",
                   receipt_timeout=WITNESS_TIMEOUT)
        await a.connect()
        await b.connect()
        try:
            n = 0
            while not stop.is_set():
                n += 1
                sender, receiver, target = (a, b, "witness-b") if n % 2 else (b, a, "witness-a")
                body = {"n": n, "pad": "w" * (n % 50)}
                try:
                    receipts, message = await asyncio.gather(
                        sender.send({"device": target}, "witness", body, ack=True, id=f"w{n}"),
                        receiver.next_message(timeout=WITNESS_TIMEOUT))
                except (ReceiptTimeout, TimeoutError):
                    self.findings.add(f"witness message w{n} to {target}: no message or no receipt in "
                                      f"{WITNESS_TIMEOUT:.0f} s")
                    break
                if message.body != body or message.sender not in ("witness-a", "witness-b"):
                    self.findings.add(f"witness {target} got {message.sender}: {message.body!r}, expected {body!r}")
                if [r.status for r in receipts] != ["delivered"]:
                    self.findings.add(f"witness message w{n}: receipts {receipts}")
                self.witnessed += 1
                await asyncio.sleep(0.02)  # a steady trickle, not a flood: the fuzz workers are the load
        finally:
            await a.close()
            await b.close()

    # ---- actions --------------------------------------------------------------------------------------------

    async def act_op(self, rng: random.Random) -> None:
        """Mutated ops on a connection that said hello (several, then sometimes a clean close)."""
        user = rng.choice([u for u in self.users if u != WITNESS_USER])
        device = rng.choice(self.users[user])
        text = rng.random() < 0.5
        conn = RawConnection(self, user, device, text)
        try:
            await self._ops_on(conn, rng, user, device, text)
        finally:
            await conn.close()

    async def _ops_on(self, conn: RawConnection, rng: random.Random, user: str, device: str, text: bool) -> None:
        if not await conn.open(hello=True):
            return
        for position in range(rng.randint(1, 12)):
            op = rng.choice(OPS)
            request_id = f"k{next(self.request_counter)}"
            fields = {"op": op, **TEMPLATES[op]}
            if "id" in fields:
                fields["id"] = request_id
            envelope = mutate(rng, fields, text, self.users[user])
            if op == "hello" and "token" in envelope and envelope["token"] == "":
                envelope["token"] = self.token(user, device)
            frame_text = text if rng.random() < 0.85 else not text  # the other encoding, now and then
            try:
                payload = encode(envelope, frame_text)
            except (ValueError, TypeError, OverflowError, UnicodeEncodeError):
                continue
            if envelope.get("id") == request_id and envelope.get("op") not in ("call", "hello"):
                conn.request_ids[request_id] = position  # a call is answered when its target answers
            if rng.random() < 0.1 and len(payload) > 4:  # split into fragments
                cut = rng.randint(1, len(payload) - 1)
                conn.write(frame(payload[:cut], 0x1 if frame_text else 0x2, fin=False) + frame(payload[cut:], 0x0))
            else:
                conn.write(frame(payload, 0x1 if frame_text else 0x2))
            self.inputs += 1
            if rng.random() < 0.3:
                await asyncio.sleep(rng.random() * 0.05)
        # Every answer is in once the pong of a last ping is (section 2 promises order).
        conn.write(frame(encode({"op": "ping", "id": "last"}, text), 0x1 if text else 0x2))
        waits = [asyncio.ensure_future(conn.last_pong.wait()), asyncio.ensure_future(conn.closed.wait())]
        done, pending = await asyncio.wait(waits, timeout=WITNESS_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        for waiting in pending:
            waiting.cancel()
        if not done:
            self.findings.add(f"{device}: no pong within {WITNESS_TIMEOUT:.0f} s, and the connection is open")
        if rng.random() < 0.5:
            conn.write(frame(struct.pack("!H", 1000), 0x8))

    async def act_before_hello(self, rng: random.Random) -> None:
        """Any op (mutated) as the first message, or a hello with a broken token."""
        async with self.connection("nobody", "nobody", rng.random() < 0.5, hello=False) as conn:
            if conn is None:
                return
            op = rng.choice(OPS)
            envelope = mutate(rng, {"op": op, **TEMPLATES[op]}, conn.text, [])
            if op == "hello" and rng.random() < 0.5:
                envelope["token"] = rng.choice(["", "x.y.z", self.token("fz0", "fz0-d0")[:-3] + "abc",
                                                FOREIGN_TOKENS.issue("fz0", "fz0-d0", 60)])
            with contextlib.suppress(ValueError, TypeError, OverflowError):  # not every value has each encoding
                conn.write(frame(encode(envelope, conn.text), 0x1 if conn.text else 0x2))
            self.inputs += 1
            with contextlib.suppress(TimeoutError):  # pair.redeem keeps the connection until the hello timeout
                await asyncio.wait_for(conn.closed.wait(), 5)

    @contextlib.asynccontextmanager
    async def connection(self, user: str, device: str, text: bool, hello: bool) -> AsyncIterator[Any]:
        """A raw connection (None if it could not be opened), closed afterwards whatever happens."""
        conn = RawConnection(self, user, device, text)
        try:
            yield conn if await conn.open(hello=hello) else None
        finally:
            await conn.close()

    async def act_frames(self, rng: random.Random) -> None:
        """Malformed WebSocket framing on an open (or not yet open) connection."""
        text = rng.random() < 0.5
        async with self.connection("fz1", rng.choice(self.users["fz1"]), text, rng.random() < 0.7) as conn:
            if conn is not None:
                await self._bad_frames(conn, rng, text)

    async def _bad_frames(self, conn: RawConnection, rng: random.Random, text: bool) -> None:
        ping = encode({"op": "ping", "id": 1}, text)
        choices = [
            lambda: frame(ping, 0x2, rsv=rng.randint(1, 7)),
            lambda: frame(ping, rng.choice([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])),
            lambda: frame(ping, 0x2, masked=False),
            lambda: frame(b"x", 0x0),
            lambda: frame(b"x" * 200, 0x9),
            lambda: frame(b"x", 0x9, fin=False),
            lambda: frame(struct.pack("!H", rng.choice([0, 999, 1004, 1005, 1006, 1015, 2999, 5000, 65535])), 0x8),
            lambda: frame(b"\x03", 0x8),
            lambda: frame(struct.pack("!H", 1000) + b"\xff\xfe", 0x8),
            lambda: frame(b"", 0x2, length=rng.choice([2**20 + 1, 2**40, 2**63 - 1])),
            lambda: frame(ping[:2], 0x2, fin=False) + frame(ping, 0x2),
            lambda: frame(ping[:2], 0x2, fin=False) + frame(b"x" * 60000, 0x0, fin=False) * 20,
            lambda: frame(b"\xff\xfe\xfd", 0x1),
            lambda: frame(b"", 0x1) + frame(b"", 0x2),
            lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 40))),
            lambda: frame(b"p" * 20, 0xA) + frame(ping, 0x1 if text else 0x2),
        ]
        for _ in range(rng.randint(1, 3)):
            conn.write(rng.choice(choices)())
            self.inputs += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(conn.closed.wait(), 3)

    async def act_handshake(self, rng: random.Random) -> None:
        """Slow, partial or broken WebSocket handshakes, and HTTP on the WebSocket port."""
        url = urlparse(self.server.ws_url)
        try:
            reader, writer = await asyncio.open_connection(url.hostname, url.port)
        except OSError:
            return
        request = upgrade_request(rng.choice([url.path, "/v2", "/", "/v1?x=1", "*"]), url.netloc,
                                  rng.choice(["", "X-Big: " + "a" * rng.choice([100, 8000, 17000, 70000]) + "\r\n",
                                              "Sec-WebSocket-Extensions: permessage-deflate\r\n"]))
        kind = rng.randrange(5)
        # A whole head over the limit is refused with 431, then the server closes in order: no reset.
        oversized = kind in (0, 4) and len(request) > MAX_HANDSHAKE_HEAD_BYTES
        try:
            if kind == 0:  # slowly, a few bytes at a time
                for start in range(0, len(request), max(1, len(request) // 5)):
                    writer.write(request[start:start + max(1, len(request) // 5)])
                    await asyncio.sleep(rng.random() * 0.2)
            elif kind == 1:  # half of it, then hang up
                writer.write(request[: len(request) // 2])
            elif kind == 2:
                writer.write(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))) + b"\r\n\r\n")
            elif kind == 3:
                writer.write(rng.choice([b"GET /v1 HTTP/1.0\r\n\r\n", b"POST /v1 HTTP/1.1\r\nHost: x\r\n\r\n",
                                         b"GET /v1 HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
                                         b"GET /v1 HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Version: 8\r\n"
                                         b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: x\r\n\r\n"]))
            else:
                writer.write(request)
            self.inputs += 1
            if oversized:
                await self.expect_431(reader, len(request))
            else:
                await asyncio.wait_for(reader.read(256), rng.choice([0.05, 0.5, 2]))
        except (OSError, RuntimeError, TimeoutError, asyncio.IncompleteReadError):  # RuntimeError: uvloop, closed
            pass
        finally:
            writer.close()

    async def expect_431(self, reader: asyncio.StreamReader, size: int) -> None:
        try:
            answer = await asyncio.wait_for(reader.read(), 10)  # to the server's FIN
        except ConnectionResetError:
            self.findings.add(f"an upgrade request with a {size}-byte head: a TCP reset, not 431")
            return
        if not answer.startswith(b"HTTP/1.1 431 "):
            self.findings.add(f"an upgrade request with a {size}-byte head answered {answer[:60]!r}, not 431")

    async def act_http(self, rng: random.Random) -> None:
        """Garbage and odd requests on the HTTP port (health, metrics, admin API)."""
        url = urlparse(self.server.http_url)
        try:
            reader, writer = await asyncio.open_connection(url.hostname, url.port)
        except OSError:
            return
        key = self.admin_key
        requests = [
            b"GET /healthz HTTP/1.0\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),
            bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))),
            b"GET /admin/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode() + b"x\r\n\r\n",
            b"GET /admin/users/%ff/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode() + b"\r\n\r\n",
            b"POST /admin/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n{\"user\": [1,2,3]}   ",
            b"POST /admin/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
            + b"\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            b"DELETE /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        ]
        try:
            writer.write(rng.choice(requests))
            self.inputs += 1
            answer = await asyncio.wait_for(reader.read(64), 3)
            if answer.startswith(b"HTTP/1.1 500"):
                self.findings.add(f"HTTP 500: {answer!r}")
        except (OSError, RuntimeError, TimeoutError):
            pass
        finally:
            writer.close()

    async def worker(self, index: int, stop: asyncio.Event) -> None:
        rng = random.Random(self.seed * 1000 + index)
        actions = [(self.act_op, 6), (self.act_before_hello, 2), (self.act_frames, 3), (self.act_handshake, 1),
                   (self.act_http, 1)]
        names = [a for a, _ in actions]
        weights = [w for _, w in actions]
        while not stop.is_set():
            action = rng.choices(names, weights)[0]
            self.findings.count(action.__name__)
            try:
                await asyncio.wait_for(action(rng), 30)
            except TimeoutError:
                self.findings.add(f"{action.__name__} did not finish in 30 s (seed {self.seed}, worker {index})")
            except Exception as exc:  # a bug of the fuzzer itself: reported, and it goes on
                self.findings.add(f"{action.__name__} failed in the fuzzer: {exc!r}")

    # ---- a run -------------------------------------------------------------------------------------------------

    async def run(self, seconds: float, max_inputs: int | None) -> Findings:
        await self.server.start()
        stop = asyncio.Event()
        witness = asyncio.create_task(self.witnesses(stop))
        workers: list[asyncio.Task[None]] = []
        try:
            # Warm-up: the witnesses and one round of every worker, then the memory baseline.
            workers = [asyncio.create_task(self.worker(i, stop)) for i in range(WORKERS)]
            await asyncio.sleep(min(5.0, seconds / 4))
            baseline = self.rss_kib()
            started = time.monotonic()
            next_report = started + 30
            while time.monotonic() - started < seconds and (max_inputs is None or self.inputs < max_inputs):
                await asyncio.sleep(0.5)
                if not self.server.running():
                    self.findings.add(f"the server died (exit {self.server.proc.poll() if self.server.proc else '?'})")
                    break
                if witness.done():
                    break
                if time.monotonic() >= next_report:
                    next_report += 30
                    print(f"  {time.monotonic() - started:5.0f} s: {self.inputs} inputs, {self.witnessed} witness "
                          f"messages, RSS {self.rss_kib() // 1024} MiB, {len(self.findings.items)} findings",
                          flush=True)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers, witness, return_exceptions=True), 60)
            for task in [*workers, witness]:
                if not task.cancelled() and task.exception() is not None:
                    self.findings.add(f"fuzzer task failed: {task.exception()!r}")
            if self.server.running():
                grown = (self.rss_kib() - baseline) // 1024
                if grown > self.rss_growth_mib:
                    self.findings.add(f"RSS grew by {grown} MiB (bound {self.rss_growth_mib} MiB)")
                internal = await self.internal_errors()
                if internal:
                    self.findings.add(f"rccs_errors_total{{code=\"internal\"}} is {internal}")
        finally:
            stop.set()
            for task in workers:
                task.cancel()
            if self.server.running():
                self.server.send_signal(15)
                try:
                    await asyncio.to_thread(self.server.wait, 30)
                except Exception:  # a server that does not stop is killed
                    self.server.kill()
        log = self.server.log_path.read_text(errors="replace") if self.server.log_path.exists() else ""
        for match in TRACEBACK.finditer(log):
            start = max(0, log.rfind("\n", 0, max(0, match.start() - 300)))
            self.findings.add("traceback in the server log:\n" + log[start:match.start() + 1500])
            break
        if self.witnessed == 0:
            self.findings.add("the witnesses exchanged no message at all")
        return self.findings

    async def internal_errors(self) -> float:
        url = urlparse(self.server.http_url)
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        text = (await asyncio.wait_for(reader.read(), 10)).decode(errors="replace")
        writer.close()
        match = re.search(r'^rccs_errors_total\{code="internal"\} (\S+)$', text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0


async def fuzz(seed: int, seconds: float, max_inputs: int | None = None, rss_growth_mib: int = 150,
               workdir: Path | None = None) -> tuple[Findings, Fuzzer]:
    with tempfile.TemporaryDirectory(prefix="rccs-fuzz-") as tmp:
        fuzzer = Fuzzer(seed, Path(workdir or tmp), rss_growth_mib)
        print(f"protocol fuzzer: seed {seed}, {seconds:.0f} s, server log {fuzzer.server.log_dir}", flush=True)
        findings = await fuzzer.run(seconds, max_inputs)
        print(f"protocol fuzzer: seed {seed}: {fuzzer.inputs} inputs, {fuzzer.witnessed} witness messages, "
              f"actions {findings.counts}, {len(findings.items)} findings", flush=True)
        return findings, fuzzer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=None, help="repeat a run's random choices (default: random)")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--rss-growth-mib", type=int, default=150)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the server's data and log here")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    import uvloop

    findings, _ = uvloop.run(fuzz(seed, args.minutes * 60, None, args.rss_growth_mib, args.workdir))
    for item in findings.items:
        print("-" * 60 + "\n" + item)
    print(f"seed {seed}: {'no finding' if not findings.items else f'{len(findings.items)} findings'}")
    return 1 if findings.items else 0


if __name__ == "__main__":
    sys.exit(main())
