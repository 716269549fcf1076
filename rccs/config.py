"""Server settings: one frozen object built from defaults, a TOML file, the
environment and command-line flags, in that order of increasing precedence.

Environment variables are ``RCCS_`` plus the upper-case field name
(``RCCS_PORT=9000``); the TOML file is chosen with ``--config`` or
``RCCS_CONFIG`` and holds the same field names at top level or under
``[server]``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .store.base import parse_redis_url

MAX_NODE_ID_CHARS = 96  # a handoff's id (at most 128 characters) is a serial, a random part, "@" and the node id


@dataclasses.dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8765
    http_host: str = "127.0.0.1"
    http_port: int = 8766
    data_dir: str = "rccs-data"
    token_secret: str = ""  # empty: generated into <data_dir>/token.key on first use
    heartbeat: float = 30.0  # seconds of silence before the server pings; as long again for the pong
    hello_timeout: float = 10.0
    max_message_bytes: int = 1024 * 1024
    max_connections: int = 10000
    max_outbound_bytes: int = 8 * 1024 * 1024  # unsent bytes per connection before it is dropped as too slow
    # The sockets' transport under picows: "aiofastnet" (picows' default) or "uvloop" (uvloop's own: ~7 KiB
    # less per idle connection; an oversized message's 1009 close may then reach a client as a TCP reset).
    socket_transport: str = "aiofastnet"
    log_level: str = "INFO"
    store: str = "sqlite"  # "sqlite" (<data_dir>/rccs.db), "memory" (lost at exit) or redis://HOST:PORT/DB (shared)
    dev_tokens: bool = True  # accept JWT device tokens (``rccs token issue``) besides device credentials
    session_ttl: float = 86400.0  # seconds a session opened with a credential stays authenticated unless refreshed
    session_grace: float = 120.0  # seconds a dropped session stays resumable
    pairing_code_ttl: float = 300.0
    pairing_approval: bool = False  # every pairing needs the issuing device's approval (else the issuer chooses)
    pairing_max_attempts: int = 5  # wrong secrets before a pairing code is burnt
    pairing_attempts_per_minute: int = 10  # redemption attempts per client address
    max_metadata_bytes: int = 4096  # a device's metadata as compact JSON
    public_url: str = ""  # how devices reach this server (put into pairing URIs), e.g. wss://rccs.example.org/v1
    inbox_max_messages: int = 10000  # per device
    inbox_max_bytes: int = 64 * 1024 * 1024  # per device
    inbox_overflow: str = "reject"  # "reject" (the new message fails: inbox_full) or "drop_oldest" (dropped)
    default_ttl: float = 7 * 86400.0  # seconds an ack:true message waits in an inbox when its send names no ttl
    max_ttl: float = 30 * 86400.0
    ack_timeout: float = 30.0  # seconds before an unacked message is written again (doubling each time)
    max_delivery_attempts: int = 5  # deliveries without an ack before a message becomes a dead letter
    idempotency_window: float = 86400.0  # seconds a sender's ack:true message id is remembered
    idempotency_cache: int = 10000  # message ids remembered per sender device
    webhook_url: str = ""  # POST every event here (JSON, HMAC-SHA256 signed with webhook_secret); empty: off
    webhook_secret: str = ""
    webhook_events: str = ""  # comma-separated event kinds to send; empty: all
    admin_key: str = ""  # the admin HTTP API's bearer key; empty: the admin API is off
    tls_cert: str = ""  # PEM certificate chain: with tls_key, serve wss:// and https://
    tls_key: str = ""
    log_format: str = "auto"  # "json" (JSON lines), "text", or "auto" (text on a terminal, else JSON)
    drain_timeout: float = 30.0  # seconds SIGTERM waits for everything to be written before exiting
    send_rate: float = 2000.0  # messages per second one device may send (token bucket), 0: unlimited
    send_burst: int = 4000
    # hellos per second per client address, 0: unlimited (off by default: behind a proxy every device
    # shares one address, and a personal server's devices reconnect together after a restart)
    hello_rate_per_address: float = 0.0
    state_max_doc_bytes: int = 256 * 1024  # a state document after the merge, as compact JSON
    state_max_user_bytes: int = 4 * 1024 * 1024  # all of a user's durable state documents together
    task_lease_ttl: float = 30.0  # seconds a task lease lasts when a claim or renew names no ttl
    handoff_prepare_timeout: float = 10.0  # seconds the owner has to answer handoff.prepare
    handoff_accept_timeout: float = 30.0  # seconds the target has to answer handoff.offer
    handoff_max_checkpoint_bytes: int = 256 * 1024  # a handoff's checkpoint, as msgpack
    node_id: str = ""  # this node's name in a cluster; empty: host name, process id and a random suffix

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it."""


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _coerce(name: str, value: Any) -> Any:
    kind = _FIELDS[name].type
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            result: Any = int(value)
        elif kind == "float":
            result = float(value)
        else:
            result = str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {name!r}: {value!r} is not a valid {kind}") from None
    if kind in ("int", "float") and result < 0:
        raise ConfigError(f"setting {name!r} must not be negative")
    return result


def load_settings(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Settings:
    """Build settings: defaults < TOML file < environment < flags (``None`` flags are unset)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = config_file or environ.get("RCCS_CONFIG")
    if path:
        try:
            with Path(path).open("rb") as fh:
                document = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        section = document.get("server", document)
        for key, value in section.items():
            if key == "server" and isinstance(value, dict):
                continue
            if key not in _FIELDS:
                raise ConfigError(f"config file {path}: unknown setting {key!r}")
            values[key] = _coerce(key, value)
    for name in _FIELDS:
        env_value = environ.get("RCCS_" + name.upper())
        if env_value is not None and env_value != "":
            values[name] = _coerce(name, env_value)
    for name, value in (flags or {}).items():
        if value is not None:
            if name not in _FIELDS:
                raise ConfigError(f"unknown setting {name!r}")
            values[name] = _coerce(name, value)
    settings = Settings(**values)
    for name in ("port", "http_port"):
        if getattr(settings, name) > 65535:  # caught here, the operator gets a line naming the setting
            raise ConfigError(f"setting {name!r} must be a TCP port, 0-65535 (got {getattr(settings, name)})")
    if settings.max_message_bytes < 1024:
        raise ConfigError("setting 'max_message_bytes' must be at least 1024")
    if settings.heartbeat <= 0 or settings.hello_timeout <= 0:
        raise ConfigError("settings 'heartbeat' and 'hello_timeout' must be positive")
    if settings.store not in ("sqlite", "memory"):
        if "://" not in settings.store:
            raise ConfigError("setting 'store' must be 'sqlite', 'memory' or a redis://HOST:PORT/DB URL")
        try:
            parse_redis_url(settings.store)
        except ValueError as exc:
            raise ConfigError(f"setting 'store': {exc}") from None
    if settings.session_ttl <= 0 or settings.pairing_code_ttl <= 0:
        raise ConfigError("settings 'session_ttl' and 'pairing_code_ttl' must be positive")
    if settings.socket_transport not in ("aiofastnet", "uvloop"):
        raise ConfigError("setting 'socket_transport' must be 'aiofastnet' or 'uvloop'")
    if settings.log_format not in ("auto", "json", "text"):
        raise ConfigError("setting 'log_format' must be 'auto', 'json' or 'text'")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError("settings 'tls_cert' and 'tls_key' go together")
    if settings.inbox_overflow not in ("reject", "drop_oldest"):
        raise ConfigError("setting 'inbox_overflow' must be 'reject' or 'drop_oldest'")
    if settings.ack_timeout <= 0 or settings.max_delivery_attempts < 1 or settings.max_ttl <= 0:
        raise ConfigError("settings 'ack_timeout', 'max_delivery_attempts' and 'max_ttl' must be positive")
    if min(settings.task_lease_ttl, settings.handoff_prepare_timeout, settings.handoff_accept_timeout) <= 0:
        raise ConfigError("settings 'task_lease_ttl', 'handoff_prepare_timeout' and 'handoff_accept_timeout' "
                          "must be positive")
    if len(settings.node_id) > MAX_NODE_ID_CHARS:
        raise ConfigError(f"setting 'node_id' is longer than {MAX_NODE_ID_CHARS} characters (it ends the ids of the "
                          "handoffs the node coordinates, which clients send back)")
    if settings.pairing_max_attempts < 1 or settings.pairing_attempts_per_minute < 1:
        raise ConfigError("settings 'pairing_max_attempts' and 'pairing_attempts_per_minute' must be at least 1")
    return settings
