"""Locust load test for rccs, speaking protocol v1 (docs/protocol.md) over WebSocket.

Every Locust user owns two devices of one rccs user (``lt-<n>`` with devices
``lt-<n>-a`` and ``lt-<n>-b``), each on its own connection with its own token,
minted locally with the server's secret (env ``RCCS_TOKEN_SECRET``). One task
is one round trip: a ``send`` with ``ack: true`` from one device to the other
(``device`` selector); the receiver reads the ``msg`` and acks it; the sender
reads the ``routed`` and then the ``delivered`` receipt. Requests recorded
(request type ``WS``):

- ``hello``: TCP connect + WebSocket upgrade + ``hello`` -> ``welcome``, once per connection;
- ``send+delivered``: from writing the ``send`` to reading the ``delivered`` receipt.

Anything else (an ``error`` envelope, a ``failed`` receipt, an unexpected
envelope, a close, no answer within ``--recv-timeout``) is a failure; after a
failure both connections of that user are dropped and reopened by the next task.

At exit, the checks of the original promises decide the exit code (1 if any fails):
zero failures, p99 of ``send+delivered`` below ``--p99-limit-ms`` (500), and, with
``--min-devices`` / env ``LOCUST_MIN_DEVICES``, at least that many devices online
(hello completed) at the same time. Single-process Locust only (no --processes,
no master/worker): the device count and the checks are per process.

Run it through ``loadtest/run.py``, which starts a server with a fresh secret.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import struct
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import websocket
from locust import User, events, task
from locust.runners import WorkerRunner

REQUEST_TYPE = "WS"
HELLO = "hello"
ROUNDTRIP = "send+delivered"
V1_SERVER_OPS = frozenset({"welcome", "msg", "receipt", "pong", "error"})


class ProtocolFailure(Exception):
    """The server did not keep the protocol (or not in time). Messages are low-cardinality: Locust groups by them."""


class _Fleet:
    """Devices currently online (``welcome`` received, not closed yet) in this process, and the peak."""

    online = 0
    peak = 0

    @classmethod
    def up(cls) -> None:
        cls.online += 1
        cls.peak = max(cls.peak, cls.online)

    @classmethod
    def down(cls) -> None:
        cls.online -= 1


_user_numbers = itertools.count(1)
_authority: Any = None  # rccs.auth.TokenAuthority, built at init


def _token_authority() -> Any:
    global _authority
    if _authority is None:
        secret = os.environ.get("RCCS_TOKEN_SECRET", "")
        if not secret:
            raise SystemExit("locustfile: set RCCS_TOKEN_SECRET to the server's token secret (loadtest/run.py does)")
        repo_root = str(Path(__file__).resolve().parent.parent)
        if repo_root not in sys.path:
            sys.path.insert(0, repo_root)
        from rccs.auth import TokenAuthority

        _authority = TokenAuthority(secret.encode())
    return _authority


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("rccs load test")
    group.add_argument("--min-devices", type=int, default=0, env_var="LOCUST_MIN_DEVICES",
                       help="fail unless at least this many devices were online at once (0: no check)")
    group.add_argument("--p99-limit-ms", type=float, default=500.0, env_var="LOCUST_P99_LIMIT_MS",
                       help="fail unless the p99 of send+delivered is below this (default 500)")
    group.add_argument("--recv-timeout", type=float, default=5.0, env_var="LOCUST_RECV_TIMEOUT",
                       help="seconds to wait for welcome / for a round trip before it is a failure (default 5)")
    group.add_argument("--wait-min", type=float, default=0.5, env_var="LOCUST_WAIT_MIN",
                       help="per-user pause between round trips, lower bound in seconds (default 0.5)")
    group.add_argument("--wait-max", type=float, default=1.5, env_var="LOCUST_WAIT_MAX",
                       help="per-user pause between round trips, upper bound in seconds (default 1.5)")
    group.add_argument("--payload-bytes", type=int, default=64, env_var="LOCUST_PAYLOAD_BYTES",
                       help="size of the text in each message body (default 64)")
    group.add_argument("--rccs-hosts", default="", env_var="LOCUST_RCCS_HOSTS",
                       help="comma-separated ws://HOST:PORT of several rccs nodes, users spread over them "
                            "(default: --host only)")
    group.add_argument("--user-prefix", default="lt", env_var="LOCUST_USER_PREFIX",
                       help="rccs users are <prefix>-<n> (default lt); a new prefix gives new users and devices")
    group.add_argument("--rccs-placement", choices=["cross", "within"], default="cross",
                       env_var="LOCUST_RCCS_PLACEMENT",
                       help="with --rccs-hosts: the two devices of a user on different nodes, so every round trip "
                            "crosses nodes (cross, default), or on the same node (within)")
    group.add_argument("--settle", type=float, default=0.0, env_var="LOCUST_SETTLE",
                       help="seconds to wait after (re)connecting before the next round trip (default 0; the "
                            "round trips send ack:true messages, which reach a device from its welcome on)")
    group.add_argument("--wire-encoding", choices=["msgpack", "json"], default="msgpack",
                       env_var="LOCUST_WIRE_ENCODING", help="envelope encoding of every connection (default msgpack)")


@events.init.add_listener
def _on_init(environment: Any, **_kwargs: Any) -> None:
    _token_authority()  # fail at start, not in every user, when the secret is missing


class Device:
    """One device connection: blocking websocket-client calls, which yield to gevent while waiting."""

    def __init__(self, url: str, user: str, device: str, encoding: str):
        self.url = url
        self.user = user
        self.device = device
        self.binary = encoding == "msgpack"
        self.ws: websocket.WebSocket | None = None
        self.online = False
        self.next_seq = 1

    def connect(self, deadline: float) -> None:
        token = _token_authority().issue(self.user, self.device, 3600)
        self.ws = websocket.create_connection(
            self.url,
            timeout=max(deadline - time.perf_counter(), 0.001),
            enable_multithread=False,
            skip_utf8_validation=True,
            suppress_origin=True,
        )
        self.next_seq = 1
        self.send({"op": "hello", "token": token,
                   "device": {"type": "desktop", "name": f"loadtest {self.device}", "platform": "locust"}})
        welcome, _ = self.receive(deadline, "welcome")
        if welcome.get("op") != "welcome":
            raise ProtocolFailure(f"expected welcome, got {welcome.get('op')!r}")
        if welcome.get("device") != self.device or welcome.get("user") != self.user:
            raise ProtocolFailure("welcome names another user or device")
        self.online = True
        _Fleet.up()

    def close(self) -> None:
        if self.online:
            self.online = False
            _Fleet.down()
        ws, self.ws = self.ws, None
        if ws is not None:
            with contextlib.suppress(Exception):  # closing a broken socket: nothing to report
                ws.close(timeout=0.2)

    def send(self, envelope: dict[str, Any]) -> int:
        if self.ws is None:
            raise ProtocolFailure("not connected")
        if self.binary:
            data: bytes = msgpack.packb(envelope)
            self.ws.send(data, websocket.ABNF.OPCODE_BINARY)
        else:
            data = json.dumps(envelope, separators=(",", ":")).encode()
            self.ws.send(data, websocket.ABNF.OPCODE_TEXT)
        return len(data)

    def receive(self, deadline: float, waiting_for: str) -> tuple[dict[str, Any], int]:
        """Next envelope of a v1 op (unknown ops are skipped, as the protocol asks), with its size."""
        if self.ws is None:
            raise ProtocolFailure("not connected")
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise ProtocolFailure(f"timeout waiting for {waiting_for}")
            self.ws.settimeout(remaining)
            try:
                opcode, data = self.ws.recv_data()
            except websocket.WebSocketTimeoutException:
                raise ProtocolFailure(f"timeout waiting for {waiting_for}") from None
            except websocket.WebSocketConnectionClosedException:
                raise ProtocolFailure(f"connection lost waiting for {waiting_for}") from None
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
                raise ProtocolFailure(f"closed by server (code {code}) waiting for {waiting_for}")
            try:
                if opcode == websocket.ABNF.OPCODE_BINARY:
                    envelope = msgpack.unpackb(data, raw=False)
                else:
                    envelope = json.loads(data)
            except ValueError:
                raise ProtocolFailure("undecodable envelope") from None
            if not isinstance(envelope, dict):
                raise ProtocolFailure("envelope is not a map")
            op = envelope.get("op")
            if op == "error":
                raise ProtocolFailure(f"error envelope {envelope.get('code')!r} waiting for {waiting_for}")
            if op in V1_SERVER_OPS:
                return envelope, len(data)


class RccsDevicePair(User):
    """One rccs user with two devices that send each other acked messages."""

    host = "ws://127.0.0.1:8765"

    def wait_time(self) -> float:
        options = self.environment.parsed_options
        if options is None:
            return random.uniform(0.5, 1.5)
        return random.uniform(options.wait_min, max(options.wait_min, options.wait_max))

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.timeout = options.recv_timeout if options is not None else 5.0
        self.payload = "x" * (options.payload_bytes if options is not None else 64)
        encoding = options.wire_encoding if options is not None else "msgpack"
        number = next(_user_numbers)
        user = f"{options.user_prefix if options is not None else 'lt'}-{number}"
        hosts = [h for h in (options.rccs_hosts.split(",") if options is not None else []) if h] or [self.host]
        within = options is not None and options.rccs_placement == "within"
        url_a, url_b = (hosts[(number if within else 2 * number + side) % len(hosts)].rstrip("/") + "/v1"
                        for side in (0, 1))
        self.devices = (Device(url_a, user, f"{user}-a", encoding), Device(url_b, user, f"{user}-b", encoding))
        # Several nodes keep every ack:true message in the shared inbox first (protocol.md section 12): routed
        # lists the receiver under "queued", then an accepted/queued receipt comes before delivered.
        self.kept_first = options is not None and bool(options.rccs_hosts)
        self.message_ids = itertools.count(1)
        self.turn = number % 2
        self._connect_missing()

    def on_stop(self) -> None:
        for device in self.devices:
            device.close()

    def _fire(self, name: str, started: float, length: int, exception: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type=REQUEST_TYPE,
            name=name,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=length,
            exception=exception,
            context={},
        )

    def _connect_missing(self) -> bool:
        """Open the connections that are not open; True when both are online."""
        opened = False
        for device in self.devices:
            if device.online:
                continue
            device.close()
            started = time.perf_counter()
            try:
                device.connect(started + self.timeout)
            except (ProtocolFailure, websocket.WebSocketException, OSError) as exc:
                device.close()
                self._fire(HELLO, started, 0, _failure(exc))
                return False
            self._fire(HELLO, started, 0)
            opened = True
        options = self.environment.parsed_options
        if opened and options is not None and options.settle > 0:
            time.sleep(options.settle)  # gevent's sleep under Locust: other users go on
        return True

    @task
    def roundtrip(self) -> None:
        if not self._connect_missing():
            return
        self.turn ^= 1
        sender, receiver = self.devices if self.turn else self.devices[::-1]
        message_id = next(self.message_ids)
        started = time.perf_counter()
        deadline = started + self.timeout
        received = 0
        try:
            sender.send({"op": "send", "id": message_id, "to": {"device": receiver.device},
                         "type": "loadtest", "body": {"n": message_id, "text": self.payload}, "ack": True})

            msg, size = receiver.receive(deadline, "msg")
            received += size
            if msg.get("op") != "msg" or msg.get("id") != message_id or msg.get("from") != sender.device:
                raise ProtocolFailure(f"expected the msg, got {msg.get('op')!r}")
            if msg.get("ack") is not True or msg.get("type") != "loadtest":
                raise ProtocolFailure("msg lost its ack flag or type")
            if msg.get("seq") != receiver.next_seq:
                raise ProtocolFailure("msg seq is not the previous one + 1")
            receiver.next_seq += 1
            receiver.send({"op": "ack", "seq": msg["seq"]})

            for status in ("routed", "kept", "delivered") if self.kept_first else ("routed", "delivered"):
                receipt, size = sender.receive(deadline, f"{status} receipt")
                received += size
                if receipt.get("op") != "receipt" or receipt.get("id") != message_id:
                    raise ProtocolFailure(f"expected the {status} receipt, got {receipt.get('op')!r}")
                if status == "kept" and receipt.get("status") in ("accepted", "queued"):
                    if receipt.get("device") != receiver.device:
                        raise ProtocolFailure("accepted/queued receipt names another device")
                    continue
                if receipt.get("status") != status:
                    reason = receipt.get("reason")
                    raise ProtocolFailure(f"expected {status}, got receipt {receipt.get('status')!r} ({reason})")
                if status == "routed" and ((receipt.get("devices"), receipt.get("queued")) != ([], [receiver.device])
                                           if self.kept_first else receipt.get("devices") != [receiver.device]):
                    raise ProtocolFailure("routed receipt does not list exactly the receiver")
                if status == "delivered" and receipt.get("device") != receiver.device:
                    raise ProtocolFailure("delivered receipt names another device")
        except (ProtocolFailure, websocket.WebSocketException, OSError) as exc:
            self._fire(ROUNDTRIP, started, received, _failure(exc))
            for device in self.devices:  # state unknown (late envelopes may follow): start over
                device.close()
            return
        self._fire(ROUNDTRIP, started, received)


def _failure(exc: Exception) -> Exception:
    if isinstance(exc, ProtocolFailure):
        return exc
    return ProtocolFailure(f"{type(exc).__name__}: {exc}")


def _percentiles(entry: Any) -> str:
    if entry is None or entry.num_requests == 0:
        return "n=0"
    p50, p95, p99 = (entry.get_response_time_percentile(p) for p in (0.50, 0.95, 0.99))
    return f"n={entry.num_requests} fail={entry.num_failures} p50/p95/p99={p50:.0f}/{p95:.0f}/{p99:.0f} ms"


@events.quitting.add_listener
def _check_promises(environment: Any, **_kwargs: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    options = environment.parsed_options
    p99_limit = options.p99_limit_ms if options is not None else 500.0
    min_devices = options.min_devices if options is not None else int(os.environ.get("LOCUST_MIN_DEVICES") or 0)
    stats = environment.stats
    roundtrip = stats.entries.get((ROUNDTRIP, REQUEST_TYPE))
    hello = stats.entries.get((HELLO, REQUEST_TYPE))

    failures = stats.total.num_failures
    checks = [(f"failures={failures} (want 0)", failures == 0)]
    if roundtrip is None or roundtrip.num_requests == 0:
        checks.append((f"{ROUNDTRIP} p99=n/a (no round trips)", False))
    else:
        p99 = roundtrip.get_response_time_percentile(0.99)
        checks.append((f"{ROUNDTRIP} p99={p99:.0f} ms (want < {p99_limit:g})", p99 < p99_limit))
    if min_devices > 0:
        checks.append((f"peak devices={_Fleet.peak} (want >= {min_devices})", _Fleet.peak >= min_devices))
    else:
        checks.append((f"peak devices={_Fleet.peak} (no minimum)", True))

    passed = all(ok for _, ok in checks)
    print(f"rccs loadtest: {ROUNDTRIP} {_percentiles(roundtrip)}; {HELLO} {_percentiles(hello)}", flush=True)
    print("rccs loadtest: " + " | ".join(f"{text} {'ok' if ok else 'FAIL'}" for text, ok in checks)
          + f" => {'PASS' if passed else 'FAIL'}", flush=True)
    if not passed:
        environment.process_exit_code = 1
