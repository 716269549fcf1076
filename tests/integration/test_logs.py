"""Logging (rccs/logs.py): JSON lines or text, secrets redacted; and a real ``rccs serve`` whose log,
written as JSON lines at DEBUG while devices say hello, pair, refresh and fail to authenticate, holds
nothing but JSON and none of the secrets it saw."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import secrets
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest

from rccs import cli
from rccs.auth import TokenAuthority
from rccs.client import Client, ClientError, ConnectionClosed, pair
from rccs.config import Settings
from rccs.credentials import new_credential
from rccs.logs import (
    JsonFormatter,
    LogHandler,
    RedactingFilter,
    TextFormatter,
    configure_logging,
    make_handler,
    resolve_format,
)
from rccs.testing import ServerProcess, child_environment

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
REQUIRED_KEYS = {"ts", "level", "logger", "msg"}
LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def a_jwt():
    return TokenAuthority(secrets.token_hex(32).encode()).issue("alice", "alice-phone", 3600)


def record(msg, *args, exc_info=None, **extra):
    logger = logging.getLogger("rccs.test")
    return logger.makeRecord("rccs.test", logging.INFO, __file__, 1, msg, args, exc_info, extra=extra)


# ---- the redacting filter -----------------------------------------------------


def test_the_filter_redacts_credentials_tokens_bearer_values_and_configured_secrets():
    credential, _ = new_credential()
    token = a_jwt()
    settings = Settings(admin_key="adm-" + secrets.token_hex(8), token_secret=secrets.token_hex(32),
                        webhook_secret="hook-" + secrets.token_hex(8))
    redactor = RedactingFilter.from_settings(settings)
    text = (f"cred={credential} token {token} Authorization: Bearer opaque.value-123 "
            f"key={settings.admin_key} secret={settings.token_secret} hook={settings.webhook_secret} code 7KQ2-M9XD")
    redacted = redactor.redact(text)
    for secret in (credential, token, "opaque.value-123", settings.admin_key, settings.token_secret,
                   settings.webhook_secret):
        assert secret not in redacted
    assert redacted == ("cred=[redacted credential] token [redacted token] Authorization: Bearer [redacted] "
                        "key=[redacted admin_key] secret=[redacted token_secret] hook=[redacted webhook_secret] "
                        "code 7KQ2-M9XD")  # pairing codes are short-lived: kept
    assert redactor.redact(redacted) == redacted  # twice is once
    assert redactor.redact("bearer abc") == "bearer [redacted]"
    # Not secrets: short rccs_ names, two-segment strings, the word alone.
    for harmless in ("rccs_messages_total", "eyJhbGciOi.only-two", "rccs_ plain", "no secrets here"):
        assert redactor.redact(harmless) == harmless


def test_the_filter_redacts_the_rendered_message_extra_fields_and_tracebacks():
    credential, _ = new_credential()
    token = a_jwt()
    redactor = RedactingFilter([("admin_key", "s3cret-admin")])
    try:
        raise ValueError(f"bad credential {credential}")
    except ValueError:
        exc_info = sys.exc_info()
    rec = record("hello from %s with %r", "peer", {"token": token}, exc_info=exc_info,
                 device="alice-phone", headers={"Authorization": "Bearer s3cret-admin"}, seen=[token, 3],
                 count=7, obj=Path(f"/tmp/{credential}"))
    assert redactor.filter(rec) is True
    assert rec.getMessage() == "hello from peer with {'token': '[redacted token]'}"
    assert rec.args == ()
    assert rec.device == "alice-phone"
    assert rec.headers == {"Authorization": "Bearer [redacted admin_key]"}
    assert rec.seen == ["[redacted token]", 3]
    assert rec.count == 7
    assert rec.obj == "/tmp/[redacted credential]"
    assert rec.exc_text is not None and "ValueError: bad credential [redacted credential]" in rec.exc_text
    for formatter in (JsonFormatter(), TextFormatter()):
        out = formatter.format(rec)
        assert credential not in out and token not in out and "s3cret-admin" not in out


def test_the_filter_redacts_the_escaped_forms_of_a_configured_secret():
    key = 'k"ey\\with-quotes'
    redactor = RedactingFilter([("admin_key", key)])
    assert redactor.redact(f"raw {key}") == "raw [redacted admin_key]"
    assert redactor.redact(f"repr {key!r}") == "repr '[redacted admin_key]'"
    assert redactor.redact(f"json {json.dumps(key)}") == 'json "[redacted admin_key]"'


def test_the_filter_keeps_a_record_whose_arguments_do_not_fit():
    rec = record("two %s %s", "only-one")
    assert RedactingFilter().filter(rec)
    assert rec.getMessage() == "two %s %s (log arguments that do not fit: ('only-one',))"


# ---- formatters and their choice ----------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        if self.closed:
            raise ValueError("I/O operation on closed file")  # as a real file does
        return True


@pytest.mark.parametrize(("log_format", "tty", "expected"), [
    ("auto", True, "text"), ("auto", False, "json"),
    ("json", True, "json"), ("json", False, "json"),
    ("text", True, "text"), ("text", False, "text"),
])
def test_the_format_follows_log_format_and_whether_the_stream_is_a_terminal(log_format, tty, expected):
    stream = Terminal() if tty else io.StringIO()
    assert resolve_format(log_format, stream) == expected
    handler = make_handler(Settings(log_format=log_format), stream)
    assert isinstance(handler.formatter, JsonFormatter if expected == "json" else TextFormatter)
    logger = logging.getLogger("rccs.test.choice")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("disk %s", "full", extra={"device": "d-1"})
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    line = stream.getvalue()
    if expected == "json":
        assert json.loads(line)["msg"] == "disk full"
    else:
        assert re.fullmatch(TS.pattern + r" WARNING rccs\.test\.choice: disk full device=d-1\n", line)


def test_auto_without_isatty_or_on_a_closed_stream_is_json():
    closed = Terminal()
    closed.close()
    assert resolve_format("auto", closed) == "json"
    assert resolve_format("auto", object()) == "json"
    with pytest.raises(ValueError, match="log_format"):
        resolve_format("xml", io.StringIO())


def test_a_json_line_has_the_core_keys_then_the_extra_fields_and_the_traceback():
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        rec = record("failed for %s", "alice", exc_info=sys.exc_info(), peer="127.0.0.1:5000", user="alice",
                     session="s-1", level="custom", nan=float("nan"), raw=b"\x00")
    line = JsonFormatter().format(rec)
    assert "\n" not in line and line.isascii()
    data = json.loads(line)
    assert list(data)[:4] == ["ts", "level", "logger", "msg"]
    assert TS.fullmatch(data["ts"])
    assert (data["level"], data["logger"], data["msg"]) == ("INFO", "rccs.test", "failed for alice")
    assert (data["peer"], data["user"], data["session"]) == ("127.0.0.1:5000", "alice", "s-1")
    assert data["level_"] == "custom"  # an extra field never hides a core key
    assert data["nan"] == "nan" and data["raw"] == "b'\\x00'"
    assert data["exc"].startswith("Traceback") and "RuntimeError: boom\nsecond line" in data["exc"]


def test_the_text_format_shows_extra_fields_the_message_does_not():
    rec = record("device.connected user=alice device=d-1", user="alice", device="d-1", peer="127.0.0.1:1")
    assert TextFormatter().format(rec).endswith(": device.connected user=alice device=d-1 peer=127.0.0.1:1")


@pytest.fixture
def root_logging():
    root = logging.getLogger()
    handlers, level, picows = list(root.handlers), root.level, logging.getLogger("picows").level
    yield root
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger("picows").setLevel(picows)
    logging.captureWarnings(False)


def test_configure_logging_installs_one_handler_and_quiets_picows_below_debug(root_logging):
    stream = io.StringIO()
    first = configure_logging(Settings(log_level="info", log_format="json", admin_key="the-admin-key"), stream)
    assert first in root_logging.handlers and root_logging.level == logging.INFO
    assert logging.getLogger("picows").level == logging.WARNING
    second = configure_logging(Settings(log_level="DEBUG", log_format="json", admin_key="the-admin-key"), stream)
    assert first not in root_logging.handlers
    assert [h for h in root_logging.handlers if isinstance(h, LogHandler)] == [second]
    assert logging.getLogger("picows").getEffectiveLevel() == logging.DEBUG
    logging.getLogger("rccs.test").debug("key is the-admin-key")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a warning, logged", UserWarning, stacklevel=1)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["logger"], line["level"]) for line in lines] == [("rccs.test", "DEBUG"), ("py.warnings", "WARNING")]
    assert lines[0]["msg"] == "key is [redacted admin_key]"
    with pytest.raises(ValueError, match="log_level"):
        configure_logging(Settings(log_level="loud"), stream)


def test_serve_flags_reach_the_logging_admin_tls_drain_and_rate_settings(capsys):
    args = cli.build_parser().parse_args([
        "serve", "--log-format", "json", "--admin-key", "k", "--tls-cert", "c.pem", "--tls-key", "k.pem",
        "--drain-timeout", "5", "--send-rate", "100", "--send-burst", "50", "--hello-rate-per-address", "2.5",
    ])
    settings = cli._settings(args)
    assert (settings.log_format, settings.admin_key, settings.tls_cert, settings.tls_key) == (
        "json", "k", "c.pem", "k.pem")
    assert (settings.drain_timeout, settings.send_rate, settings.send_burst, settings.hello_rate_per_address) == (
        5.0, 100.0, 50, 2.5)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--log-format", "xml"])
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--help"])
    assert "RCCS_ADMIN_KEY" in capsys.readouterr().out  # the flag's help points to the safer way


# ---- a real server --------------------------------------------------------------


def server_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def http_get(url: str, headers: dict[str, str]) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def refused(client: Client) -> None:
    with pytest.raises((ConnectionClosed, ClientError)):
        await asyncio.wait_for(client.connect(), 10)
    await client.close()


async def test_a_served_json_log_holds_only_json_and_no_secret(tmp_path):
    token_secret = secrets.token_hex(32)
    admin_key = "admin-" + secrets.token_urlsafe(24)
    server = ServerProcess(tmp_path / "data", "--log-format", "json", "--log-level", "DEBUG",
                           env=child_environment(RCCS_ADMIN_KEY=admin_key, RCCS_TOKEN_SECRET=token_secret,
                                                 RCCS_INBOX_MAX_MESSAGES="1"))
    seen: list[str] = [admin_key, token_secret]  # every secret the server got; none may be in its log
    clients: list[Client] = []
    try:
        await server.start()
        ws_url, http_url = server.ws_url, server.http_url
        tokens = TokenAuthority(token_secret.encode())
        desktop_token = tokens.issue("alice", "alice-desktop", 3600)
        phone_token = tokens.issue("alice", "alice-phone", 3600)
        seen += [desktop_token, phone_token]
        desktop = Client(ws_url, desktop_token, {"type": "desktop", "name": "Desktop"}, reconnect=False)
        phone = Client(ws_url, phone_token, {"type": "mobile", "name": "Phone"}, reconnect=False, encoding="json")
        clients += [desktop, phone]
        await desktop.connect()
        await phone.connect()

        # Pairing: the desktop makes a code, a new tablet redeems it and gets its credential...
        code = (await desktop.create_pairing_code())["code"]
        tablet = await asyncio.wait_for(pair(ws_url, code, {"type": "tablet", "name": "Tablet"}, reconnect=False), 10)
        clients.append(tablet)
        credential = tablet.credential
        assert credential is not None and credential.startswith("rccs_")
        seen.append(credential)
        await tablet.close()
        # ... and says hello with it.
        tablet = Client(ws_url, None, {"type": "tablet"}, credential=credential, reconnect=False)
        clients.append(tablet)
        await tablet.connect()
        assert await tablet.refresh(credential=credential) > 0

        # A refresh with a fresh token, and one with a forged token.
        fresh = tokens.issue("alice", "alice-desktop", 7200)
        seen.append(fresh)
        assert await desktop.refresh(token=fresh) > 0
        forged_refresh = TokenAuthority(secrets.token_hex(32).encode()).issue("alice", "alice-desktop", 3600)
        seen.append(forged_refresh)
        with pytest.raises(ClientError):
            await desktop.refresh(token=forged_refresh)

        # Hellos that must fail: a token signed with another secret, a token with its signature changed,
        # a well-formed credential nobody was given, the tablet's credential with one character changed.
        forged_token = TokenAuthority(secrets.token_hex(32).encode()).issue("alice", "alice-phone", 3600)
        head, payload, signature = phone_token.split(".")
        tampered = f"{head}.{payload}.{signature[::-1]}"
        unknown_credential, _ = new_credential()
        altered = credential[:-1] + ("A" if credential[-1] != "A" else "B")
        seen += [forged_token, tampered, unknown_credential, altered]
        for bad in (Client(ws_url, forged_token, {"type": "mobile"}, reconnect=False),
                    Client(ws_url, tampered, {"type": "mobile"}, reconnect=False),
                    Client(ws_url, None, {"type": "mobile"}, credential=unknown_credential, reconnect=False),
                    Client(ws_url, None, {"type": "mobile"}, credential=altered, reconnect=False)):
            await refused(bad)

        # The admin API with the key and with a wrong one (whatever it answers: what counts is the log).
        wrong_key = "wrong-" + secrets.token_urlsafe(24)
        seen.append(wrong_key)
        for key in (admin_key, wrong_key):
            status = await asyncio.to_thread(http_get, f"{http_url}/admin/devices", {"Authorization": f"Bearer {key}"})
            assert status < 500

        # A secret where the server does log it: a message id is in the message.failed event.
        # (A JWT's shape; message ids are at most 128 characters.)
        leaked_id = f"eyJ{secrets.token_urlsafe(12)}.{secrets.token_urlsafe(24)}.{secrets.token_urlsafe(32)}"
        seen.append(leaked_id)
        # The phone goes offline; its inbox holds one message (RCCS_INBOX_MAX_MESSAGES), so the second fails.
        await phone.close()
        first = await desktop.send({"device": "alice-phone"}, "note", {"n": 1}, ack=True, timeout=10)
        assert [r.status for r in first if r.status != "routed"] == ["queued"]
        second = await desktop.send({"device": "alice-phone"}, "note", {"n": 2}, ack=True, id=leaked_id, timeout=10)
        assert [(r.status, r.reason) for r in second if r.status != "routed"] == [("failed", "inbox_full")]

        await tablet.close()
        server.send_signal(signal.SIGTERM)  # the desktop is still connected: closed by the drain
        closed = await asyncio.wait_for(desktop.closed, 10)
        assert closed.code == 1001
        assert await asyncio.to_thread(server.wait, 15) == 0
    finally:
        for client in clients:
            await client.close()
        server.kill()

    text = server.log_path.read_text(encoding="utf-8")  # the process that served (a retry has a log of its own)
    lines = server_lines(server.log_path)
    assert lines, "the server logged nothing"
    records = []
    for line in lines:
        data = json.loads(line)  # every line: one JSON object
        assert isinstance(data, dict), line
        assert data.keys() >= REQUIRED_KEYS, line
        assert TS.fullmatch(data["ts"]), line
        assert data["level"] in LEVELS, line
        records.append(data)
    for secret in seen:
        assert secret not in text, f"a secret is in the log: {secret[:12]}..."
    # The signature of a tampered token alone is not the token, but it is still not to be shown.
    assert signature[::-1] not in text

    messages = [r["msg"] for r in records]
    assert any("fastpath=" in m and "listening on" in m for m in messages)
    assert any("joined user alice by pairing" in m for m in messages)
    assert messages[-1] == "drained"
    connected = [r for r in records if r["msg"].startswith("device.connected")]
    assert {r["device"] for r in connected} >= {"alice-desktop", "alice-phone"}
    assert all(r["user"] == "alice" and r["peer"].startswith("127.0.0.1:") and r["session"] for r in connected)
    failed = [r for r in records if r["msg"].startswith("message.failed")]
    assert failed and failed[0]["id"] == "[redacted token]" and "id=[redacted token]" in failed[0]["msg"]
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")], text


def test_serve_logs_a_failure_to_start_as_one_json_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "rccs", "serve", "--port", str(port), "--http-port", "0",
             "--data-dir", str(tmp_path), "--store", "memory", "--log-format", "json"],
            capture_output=True, text=True, timeout=60, env=child_environment(),
        )
    assert result.returncode == 1
    assert result.stdout == ""
    records = [json.loads(line) for line in result.stderr.splitlines()]
    # The operator's surroundings, not a bug: one record saying what failed, no traceback.
    assert records[-1]["level"] == "ERROR" and "exc" not in records[-1]
    assert records[-1]["msg"].startswith("rccs serve cannot start: ")
    assert str(port) in records[-1]["msg"] and "address already in use" in records[-1]["msg"]
    assert "Traceback" not in result.stderr
