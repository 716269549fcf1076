"""``rccs`` command line: ``serve``, ``token issue``, ``version``, the registry commands
``users``, ``devices`` and ``sessions``, and ``inbox`` and ``deadletters`` for durable
delivery; these work on the store in the data directory (whether or not a server is
running on it). ``store copy`` moves a whole store into another (no server may run on either).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from . import __version__, admin
from .auth import TokenAuthority, TokenError, load_or_create_secret, parse_duration
from .config import ConfigError, Settings, load_settings
from .logs import configure_logging
from .store import DB_FILE, STATUS_OFFLINE, SessionRecord, Store, StoreError, is_store_url, open_store

T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that takes an argument starting with ``-`` as a value when it names none of the
    command's options.

    Ids may start with ``-`` (``-dash`` is a valid device id, and about one session id in 64 starts with
    one: they come from ``secrets.token_urlsafe``). Plain argparse takes ``rccs devices revoke -dash`` for
    an unknown option and then misses the id; an id copied from ``rccs sessions list`` must just work.
    The only ids that still need ``--`` (or ``--device=ID``) are those spelling an option of the command
    itself, such as ``-h`` or ``--json``. A mistyped option still fails: it fills no slot, or the one it
    fills leaves a real argument over, and both are reported as errors.
    """

    def _parse_optional(self, arg_string: str) -> Any:
        if arg_string.startswith("-") and len(arg_string) > 1 and not self._names_an_option(arg_string):
            return None  # argparse's answer for "a positional argument, or an option's value"
        return super()._parse_optional(arg_string)

    def _names_an_option(self, arg_string: str) -> bool:
        name = arg_string.split("=", 1)[0]
        options = self._option_string_actions
        if name in options:
            return True
        # argparse also accepts unambiguous abbreviations of long options (--data for --data-dir).
        return self.allow_abbrev and name.startswith("--") and any(option.startswith(name) for option in options)


def _server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML settings file (also RCCS_CONFIG)")
    parser.add_argument("--host", help="WebSocket listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="WebSocket port, 0 picks a free one (default 8765)")
    parser.add_argument("--http-host", dest="http_host", help="HTTP listen address (default 127.0.0.1)")
    parser.add_argument("--http-port", dest="http_port", type=int, help="HTTP port (default 8766)")
    parser.add_argument("--data-dir", dest="data_dir",
                        help="directory for the store (rccs.db) and the token secret (default ./rccs-data)")
    parser.add_argument("--heartbeat", type=float, help="seconds of silence before a ping (default 30)")
    parser.add_argument("--hello-timeout", dest="hello_timeout", type=float, help="seconds to say hello (default 10)")
    parser.add_argument("--max-message-bytes", dest="max_message_bytes", type=int,
                        help="largest accepted WebSocket message (default 1048576)")
    parser.add_argument("--max-connections", dest="max_connections", type=int, help="default 10000")
    parser.add_argument("--max-outbound-bytes", dest="max_outbound_bytes", type=int,
                        help="unsent bytes per connection before it is dropped as too slow (default 8 MiB)")
    parser.add_argument("--socket-transport", dest="socket_transport", choices=("aiofastnet", "uvloop"),
                        help="the sockets' transport under picows: aiofastnet (default) or uvloop (less memory "
                             "per connection; an oversized message's close may reach the client as a reset)")
    parser.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING, ERROR (default INFO)")
    parser.add_argument("--log-format", dest="log_format", choices=("auto", "json", "text"),
                        help="json: one JSON object per line; text: readable lines; auto: text on a terminal, "
                             "else JSON (default auto)")
    parser.add_argument("--admin-key", dest="admin_key",
                        help="bearer key of the admin HTTP API (default: none, the API is off); prefer the "
                             "RCCS_ADMIN_KEY environment variable or the config file: flags show in 'ps'")
    parser.add_argument("--tls-cert", dest="tls_cert",
                        help="PEM certificate chain; with --tls-key, serve wss:// and https://")
    parser.add_argument("--tls-key", dest="tls_key", help="PEM private key of --tls-cert")
    parser.add_argument("--drain-timeout", dest="drain_timeout", type=float,
                        help="seconds SIGTERM/SIGINT waits for the drain before exiting anyway (default 30)")
    parser.add_argument("--send-rate", dest="send_rate", type=float,
                        help="messages per second one device may send, 0: unlimited (default 2000)")
    parser.add_argument("--send-burst", dest="send_burst", type=int,
                        help="largest burst of messages from one device (token bucket size, default 4000)")
    parser.add_argument("--hello-rate-per-address", dest="hello_rate_per_address", type=float,
                        help="hellos per second per client address (bursts of 5 s worth), 0: unlimited (default 0)")
    parser.add_argument("--store",
                        help="sqlite: <data-dir>/rccs.db; memory: lost at exit; redis://HOST:PORT/DB: shared by "
                             "the nodes of a cluster (default sqlite)")
    parser.add_argument("--node-id", dest="node_id",
                        help="this node's name in a cluster (default: a unique name, logged at start)")
    parser.add_argument("--dev-tokens", dest="dev_tokens", action=argparse.BooleanOptionalAction, default=None,
                        help="accept JWT device tokens from 'rccs token issue' (default on)")
    parser.add_argument("--session-ttl", dest="session_ttl", type=float,
                        help="seconds a session stays authenticated unless refreshed (default 86400)")
    parser.add_argument("--session-grace", dest="session_grace", type=float,
                        help="seconds a dropped session stays resumable (default 120)")
    parser.add_argument("--pairing-code-ttl", dest="pairing_code_ttl", type=float,
                        help="seconds a pairing code stays valid (default 300)")
    parser.add_argument("--pairing-approval", dest="pairing_approval", action=argparse.BooleanOptionalAction,
                        default=None, help="every pairing needs the issuing device's approval (default off)")
    parser.add_argument("--pairing-max-attempts", dest="pairing_max_attempts", type=int,
                        help="wrong secrets before a pairing code is burnt (default 5)")
    parser.add_argument("--pairing-attempts-per-minute", dest="pairing_attempts_per_minute", type=int,
                        help="pairing attempts per client address and minute (default 10)")
    parser.add_argument("--max-metadata-bytes", dest="max_metadata_bytes", type=int,
                        help="largest device metadata as compact JSON (default 4096)")
    parser.add_argument("--public-url", dest="public_url",
                        help="how devices reach this server, put into pairing URIs (e.g. wss://rccs.example.org/v1)")


def _settings(args: argparse.Namespace) -> Settings:
    # Each subcommand defines only some flags; every Settings field it lacks stays unset here.
    flags = {name: getattr(args, name, None) for name in Settings.__dataclass_fields__}
    return load_settings(flags=flags, config_file=args.config)


async def _serve(settings: Settings) -> None:
    from .node import Node

    node = Node(settings)
    await node.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log = logging.getLogger("rccs")
    log.info("signal received, draining: closing connections (1001), saving sessions, inboxes and receipts")
    try:
        await asyncio.wait_for(node.stop(), settings.drain_timeout)
    except TimeoutError:
        log.error("drain did not finish within %.0f s (drain_timeout); exiting anyway", settings.drain_timeout)
        raise SystemExit(1) from None
    log.info("drained")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    settings = _settings(args)
    configure_logging(settings)  # JSON lines or text (log_format), secrets redacted; picows quiet below DEBUG
    # Every connection leaves a few dozen long-lived objects that the cycle collector otherwise walks again
    # and again while thousands of devices connect. Young collections every 5,000 allocations instead of
    # 700, and start-up objects frozen out of the collector: connect + hello 1,153 -> 1,352 devices/s at
    # similar memory (benchmarks/e2e/scale.py connect, 19,000 devices; 50,000 was faster still but grew
    # the memory per device by half).
    gc.set_threshold(5_000, 20, 100)
    gc.freeze()
    try:
        uvloop.run(_serve(settings))
    except (ConfigError, TokenError, ValueError, StoreError):
        raise  # the operator's mistake or the store's: main() prints it as for every command
    except OSError as exc:
        # A port in use, an address this host does not have, a data dir or TLS file it cannot read: the
        # operator's environment, not a bug, so one line saying what failed rather than a traceback.
        logging.getLogger("rccs").error("rccs serve cannot start: %s", exc.strerror or exc)
        return 1
    except Exception:
        # Anything else is a bug: logged with its traceback, not printed, so a JSON log stays all JSON lines.
        logging.getLogger("rccs").exception("rccs serve failed")
        return 1
    return 0


def cmd_token_issue(args: argparse.Namespace) -> int:
    settings = _settings(args)
    ttl = parse_duration(args.ttl)
    if settings.token_secret:
        secret = settings.token_secret.encode()
    elif is_store_url(settings.store):
        secret = _with_store(settings, lambda store: store.token_secret())
    else:
        secret = load_or_create_secret(settings.data_dir)
    token = TokenAuthority(secret).issue(args.user, args.device, ttl)  # checks both ids first
    if settings.store != "memory":
        # A memory-store server starts empty and registers token devices at hello; a store on
        # disk learns them here, so they show in 'rccs devices list' before they first connect.
        _with_store(settings, lambda store: admin.ensure_device_for_token(store, args.user, args.device, _now_ms()))
    print(token)
    return 0


# ---- registry commands -------------------------------------------------------


def _now_ms() -> int:
    return int(time.time() * 1000)


def _with_store(settings: Settings, operation: Callable[[Store], Awaitable[T]]) -> T:
    async def run() -> T:
        store = open_store("memory" if settings.store == "memory" else settings.store, settings.data_dir)
        await store.open()
        try:
            return await operation(store)
        finally:
            await store.close()

    return asyncio.run(run())


def _registry_settings(args: argparse.Namespace, *, creates: bool) -> Settings:
    """Settings for a users/devices/sessions command; refuses a data dir it cannot be meant for.

    Only ``users add`` may start a store in an empty directory: anything else there is almost
    certainly a mistyped --data-dir, and would otherwise leave a stray empty store behind.
    """
    settings = _settings(args)
    if settings.store == "memory":
        raise ConfigError("setting 'store' is 'memory': that registry lives inside the server process and "
                          "the command line cannot reach it")
    if not creates and not is_store_url(settings.store) and not (Path(settings.data_dir) / DB_FILE).exists():
        raise ConfigError(f"no store at {Path(settings.data_dir) / DB_FILE} (is --data-dir right?)")
    return settings


def _iso(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cell(value: object) -> str:
    # Names come from devices; a newline or escape sequence in one must not garble the table.
    text = str(value) if value not in (None, "") else "-"
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], empty: str) -> None:
    if not rows:
        print(empty)
        return
    cells = [list(headers)] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(line[column]) for line in cells) for column in range(len(headers))]
    for line in cells:
        print("  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip())


def _print_json(items: list[dict[str, Any]]) -> None:
    print(json.dumps(items, indent=2, ensure_ascii=False))


def _print_pairing_code(user: str, pairing: dict[str, Any]) -> None:
    print(f"pairing code: {pairing['code']}")
    print(f"pairing uri:  {pairing['uri']}")
    print(f"expires:      {_iso(pairing['expires_at'])}")
    print(f"Enter the code on {user}'s new device (or show the URI as a QR code) before it expires;"
          " it works once.")


def _pairing_ttl(args: argparse.Namespace, settings: Settings) -> float:
    return parse_duration(args.ttl) if args.ttl is not None else settings.pairing_code_ttl


def cmd_users_add(args: argparse.Namespace) -> int:
    settings = _registry_settings(args, creates=True)
    # Checked before the store is opened, which would create it in an empty data directory.
    admin.check_id("user", args.user)
    if args.device is not None:
        admin.check_id("device", args.device)
    if args.device is None:
        if args.type is not None or args.name is not None:
            raise ValueError("--type and --name describe the device made with --device")
        ttl = _pairing_ttl(args, settings)

        async def add_and_pair(store: Store) -> dict[str, Any]:
            await admin.add_user(store, args.user, _now_ms())
            return await admin.create_pairing_code(
                store, args.user, ttl_seconds=ttl, public_url=settings.public_url, now=_now_ms()
            )

        pairing = _with_store(settings, add_and_pair)
        print(f"added user {args.user}")
        _print_pairing_code(args.user, pairing)
        return 0
    if args.ttl is not None:
        raise ValueError("--ttl is the pairing code's lifetime; with --device there is no pairing code")
    _, device, credential = _with_store(settings, lambda store: admin.add_user_with_device(
        store, args.user, device_id=args.device, device_type=args.type or admin.UNKNOWN_DEVICE_TYPE,
        name=args.name or "", now=_now_ms()))
    print(f"added user {args.user}")
    print(f"added device {device.id} (type {device.type})")
    print(f"credential: {credential}")
    print("The credential is shown once and cannot be recovered: put it on the device now.")
    return 0


def cmd_users_pair(args: argparse.Namespace) -> int:
    settings = _registry_settings(args, creates=False)
    ttl = _pairing_ttl(args, settings)
    pairing = _with_store(settings, lambda store: admin.create_pairing_code(
        store, args.user, ttl_seconds=ttl, public_url=settings.public_url, now=_now_ms()))
    _print_pairing_code(args.user, pairing)
    return 0


def cmd_users_list(args: argparse.Namespace) -> int:
    settings = _registry_settings(args, creates=False)

    async def load(store: Store) -> list[dict[str, Any]]:
        views = []
        for user in await store.list_users():
            devices = await store.list_devices(user.id)
            online = sum(1 for device in devices if device.status != STATUS_OFFLINE)
            views.append({**admin.user_view(user), "devices": len(devices), "online": online})
        return views

    views = _with_store(settings, load)
    if args.json:
        _print_json(views)
        return 0
    _print_table(("USER", "CREATED", "DEVICES", "ONLINE"),
                 [(v["id"], _iso(v["created"]), v["devices"], v["online"]) for v in views], "no users")
    return 0


def cmd_users_remove(args: argparse.Namespace) -> int:
    settings = _registry_settings(args, creates=False)
    revoked = _with_store(settings, lambda store: admin.remove_user(store, args.user, _now_ms()))
    print(f"removed user {args.user}: {len(revoked)} device(s) revoked, its sessions and pairing codes deleted")
    return 0


def cmd_devices_list(args: argparse.Namespace) -> int:
    settings = _registry_settings(args, creates=False)

    async def load(store: Store) -> list[dict[str, Any]]:
        if args.user is not None and not args.all:
            # A removed user's devices survive as revoked tombstones, so only --all can find them.
            admin.check_id("user", args.user)
            if await store.get_user(args.user) is None:
                raise admin.AdminError(f"unknown user {args.user!r}")
        devices = await store.list_devices(args.user, include_revoked=args.all)
        return [admin.device_view(device) for device in devices]

    views = _with_store(settings, load)
    if args.json:
        _print_json(views)
        return 0
    headers = ["DEVICE", "USER", "TYPE", "NAME", "STATUS", "LAST SEEN", "CREATED"]
    rows: list[list[object]] = []
    for v in views:
        status = "revoked" if v["revoked_at"] is not None else v["status"]
        row: list[object] = [v["id"], v["user"], v["type"], v["name"], status, _iso(v["last_seen"]),
                             _iso(v["created"])]
        if args.all:
            row.append(_iso(v["revoked_at"]))
        rows.append(row)
    if args.all:
        headers.append("REVOKED")
    _print_table(headers, rows, "no devices")
    return 0


def cmd_devices_revoke(args: argparse.Namespace) -> int:
    settings = _registry_settings(args, creates=False)
    device = _with_store(settings, lambda store: admin.revoke_device(store, args.device, _now_ms()))
    print(f"revoked device {device.id} of user {device.user}: its credential and sessions no longer work")
    return 0


def cmd_devices_rename(args: argparse.Namespace) -> int:
    settings = _registry_settings(args, creates=False)
    admin.check_device_name(args.name)  # before touching the store
    device = _with_store(settings, lambda store: admin.rename_device(store, args.device, args.name, _now_ms()))
    print(f"renamed device {device.id} to {device.name!r}")
    return 0


def _session_state(session: SessionRecord, now: int) -> str:
    if session.revoked_at is not None:
        return "revoked"
    if session.connected_at is not None:
        return "connected"
    if session.expires_at < now:
        return "expired"
    return "disconnected"


def cmd_sessions_list(args: argparse.Namespace) -> int:
    settings = _registry_settings(args, creates=False)
    sessions = _with_store(settings, lambda store: store.list_sessions(args.user, args.device))
    if args.json:
        _print_json([admin.session_view(session) for session in sessions])
        return 0
    now = _now_ms()
    headers = ("SESSION", "USER", "DEVICE", "STATE", "CREATED", "EXPIRES", "LAST ACTIVITY",
               "MSGS IN", "MSGS OUT", "BYTES IN", "BYTES OUT", "PENDING")
    rows = [(s.id, s.user, s.device, _session_state(s, now), _iso(s.created), _iso(s.expires_at),
             _iso(s.last_activity), s.messages_in, s.messages_out, s.bytes_in, s.bytes_out, len(s.pending))
            for s in sessions]
    _print_table(headers, rows, "no sessions")
    return 0


def cmd_sessions_revoke(args: argparse.Namespace) -> int:
    settings = _registry_settings(args, creates=False)
    session = _with_store(settings, lambda store: admin.revoke_session(store, args.session, _now_ms()))
    print(f"revoked session {session.id} of device {session.device} (user {session.user})")
    return 0


# ---- inbox and dead letter commands -------------------------------------------

DEFAULT_LIST_LIMIT = 1000


def _limit(args: argparse.Namespace) -> int:
    limit: int = args.limit
    if limit < 1:
        raise ValueError(f"--limit must be at least 1 (got {limit})")
    return limit


def _more_note(shown: int, what: str) -> None:
    print(f"(only the first {shown} {what} are listed; --limit shows more)")


def cmd_inbox_list(args: argparse.Namespace) -> int:
    settings = _registry_settings(args, creates=False)
    limit = _limit(args)
    now = _now_ms()
    # One more than asked for tells whether the list was cut short.
    messages, count, size = _with_store(settings, lambda store: admin.device_inbox(store, args.device, now, limit + 1))
    more = len(messages) > limit
    messages = messages[:limit]
    if args.json:
        print(json.dumps({"device": args.device, "count": count, "bytes": size,
                          "messages": [admin.queued_view(message) for message in messages]},
                         indent=2, ensure_ascii=False))
        return 0
    rows = [(m.id, admin.priority_name(m.priority), m.sender_device, m.msg_id, m.type, m.size, m.attempts,
             _iso(m.ts), _iso(m.expires_at)) for m in messages]
    _print_table(("ID", "PRIORITY", "FROM", "MSG ID", "TYPE", "SIZE", "ATTEMPTS", "QUEUED", "EXPIRES"), rows,
                 f"no queued messages for device {args.device}")
    print(f"total: {count} message(s), {size} bytes")
    if more:
        _more_note(limit, "messages in delivery order")
    elif count > len(messages):
        # inbox() leaves out expired messages; inbox_size() counts them until the server takes them out.
        print(f"({count - len(messages)} expired message(s) not listed: the server removes them "
              "and sends their senders 'expired')")
    return 0


def cmd_inbox_purge(args: argparse.Namespace) -> int:
    settings = _registry_settings(args, creates=False)
    purged = _with_store(settings, lambda store: admin.purge_inbox(store, args.device))
    print(f"purged {purged} message(s) from the inbox of device {args.device}")
    if purged:
        print("Their senders are NOT told: no receipt is sent for a purged message (operator action).")
    return 0


def cmd_deadletters_list(args: argparse.Namespace) -> int:
    settings = _registry_settings(args, creates=False)
    limit = _limit(args)
    letters = _with_store(settings, lambda store: admin.list_dead_letters(store, args.user, args.device, limit + 1))
    more = len(letters) > limit
    letters = letters[:limit]
    if args.json:
        _print_json([admin.dead_letter_view(letter) for letter in letters])
        return 0
    rows = [(d.message.id, d.message.device, d.message.sender_device, d.message.msg_id, d.message.type,
             admin.priority_name(d.message.priority), d.message.size, d.message.attempts, d.reason, _iso(d.at))
            for d in letters]
    _print_table(("ID", "DEVICE", "FROM", "MSG ID", "TYPE", "PRIORITY", "SIZE", "ATTEMPTS", "REASON", "DEAD SINCE"),
                 rows, "no dead letters")
    if more:
        _more_note(limit, "dead letters, oldest first,")
    return 0


def cmd_deadletters_redrive(args: argparse.Namespace) -> int:
    if bool(args.ids) == (args.device is not None):
        raise ValueError("give either dead letter ids or --device DEVICE (all of that device's dead letters)")
    settings = _registry_settings(args, creates=False)
    moved = _with_store(settings, lambda store: admin.redrive_dead_letters(
        store, ids=args.ids or None, device_id=args.device))
    if not moved:
        print("redriven 0 dead letters" + (f": device {args.device} has none" if args.device else ""))
        return 0
    per_device: dict[str, int] = {}
    for message in moved:
        per_device[message.device] = per_device.get(message.device, 0) + 1
    targets = ", ".join(f"{device} ({count})" for device, count in sorted(per_device.items()))
    print(f"redriven {len(moved)} dead letter(s) back to their inboxes, attempts reset: {targets}")
    print("They reach each device when it next connects: a running server delivers a device's inbox when it "
          "connects (a device connected now gets them after it reconnects).")
    now = _now_ms()
    expired = sum(1 for message in moved if message.expires_at is not None and message.expires_at <= now)
    if expired:
        print(f"{expired} of them expired already: the server removes those as expired instead of delivering them.")
    return 0


def cmd_deadletters_purge(args: argparse.Namespace) -> int:
    settings = _registry_settings(args, creates=False)
    purged = _with_store(settings, lambda store: admin.purge_dead_letters(store, args.device))
    print(f"purged {purged} dead letter(s) of device {args.device}")
    return 0


def cmd_store_copy(args: argparse.Namespace) -> int:
    from . import storecopy  # on demand: only this command needs the copy and the serve lock

    settings = _settings(args)
    source = storecopy.endpoint(args.source, settings.data_dir, "--from")
    target = storecopy.endpoint(args.target, settings.data_dir, "--to")
    report = asyncio.run(storecopy.run_copy(source, target))
    copied = report.copied
    print(f"copied {source.description} to {target.description}:")
    rows = [
        ("users", str(copied.users)),
        ("devices", f"{copied.devices} ({copied.revoked_devices} of them revoked)"),
        ("sessions", f"{copied.sessions}" + (f" ({copied.sessions_not_copied} of revoked devices left out: they "
                                             "cannot be resumed)" if copied.sessions_not_copied else "")),
        ("inbox messages", str(copied.inbox_messages)),
        ("dead letters", str(copied.dead_letters)),
        ("kept receipts", str(copied.receipts)),
        ("pairing codes", str(copied.pairing_codes)),
        ("state documents", f"{copied.state_documents} ({copied.state_changes} changes in their logs)"),
        ("task leases", str(copied.task_leases)),
        ("message ids", str(copied.message_ids)),
        ("token secret", "copied: dev tokens issued before stay valid" if report.secret == "copied"
         else "none in the source"),
    ]
    for kind, count in rows:
        print(f"  {kind:<16} {count}")
    print("Inbox messages and dead letters have new ids in the target (their order is kept). The source is left "
          "as it was: serve from the target only from now on.")
    return 0


def _add_store_commands(sub: Any) -> None:
    store = sub.add_parser("store", help="copy a whole store (e.g. a single node's data directory into Redis)")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    copy = store_sub.add_parser(
        "copy", help="copy everything a server needs from one store into an empty one",
        description="Copy users, devices (revoked ones too), sessions, inboxes, dead letters, kept receipts, "
                    "pairing codes, state documents with their revisions, task leases, remembered message ids and "
                    "the token secret from one store into another that holds no data, so that devices keep "
                    "their credentials, tokens and sessions. No server may run on either store meanwhile. The "
                    "source is left as it was. Refusals exit with 2, store failures with 1.",
        epilog="example: rccs store copy --from ./rccs-data --to redis://10.0.0.5:6379/0")
    copy.add_argument("--from", dest="source", required=True, metavar="SRC",
                      help="where from: a data directory, 'sqlite' (the --data-dir one), or redis://HOST:PORT/DB")
    copy.add_argument("--to", dest="target", required=True, metavar="DST",
                      help="where to, an empty store: redis://HOST:PORT/DB, a data directory, or 'sqlite'")
    copy.add_argument("--config", help="TOML settings file (also RCCS_CONFIG): its data_dir is what 'sqlite' means")
    copy.add_argument("--data-dir", dest="data_dir", help="the data directory 'sqlite' means (default ./rccs-data)")
    copy.set_defaults(handler=cmd_store_copy)


def _store_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML settings file (also RCCS_CONFIG)")
    parser.add_argument("--data-dir", dest="data_dir", help="data directory holding rccs.db (default ./rccs-data)")
    parser.add_argument("--store", help="the store to act on: sqlite (in --data-dir, the default) or the "
                                        "redis://HOST:PORT/DB of a cluster")


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def _add_registry_commands(sub: Any) -> None:
    users = sub.add_parser("users", help="add, list, pair and remove users")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    add = users_sub.add_parser("add", help="add a user and print a pairing code (or, with --device, a credential) "
                                           "for its first device")
    add.add_argument("user", help="user id")
    add.add_argument("--device", help="register this device now and print its credential instead of a pairing code")
    add.add_argument("--type", help="the --device's type, e.g. mobile, desktop (default unknown)")
    add.add_argument("--name", help="the --device's name")
    add.add_argument("--ttl", help="pairing code lifetime, e.g. 90s, 5m (default: the pairing_code_ttl setting)")
    _store_flags(add)
    add.set_defaults(handler=cmd_users_add)
    pair = users_sub.add_parser("pair", help="print a new pairing code for an existing user")
    pair.add_argument("user", help="user id")
    pair.add_argument("--ttl", help="lifetime, e.g. 90s, 5m (default: the pairing_code_ttl setting)")
    _store_flags(pair)
    pair.set_defaults(handler=cmd_users_pair)
    users_list = users_sub.add_parser("list", help="list users with their device counts")
    _json_flag(users_list)
    _store_flags(users_list)
    users_list.set_defaults(handler=cmd_users_list)
    remove = users_sub.add_parser("remove", help="remove a user: revoke its devices, delete its sessions")
    remove.add_argument("user", help="user id")
    _store_flags(remove)
    remove.set_defaults(handler=cmd_users_remove)

    devices = sub.add_parser("devices", help="list, revoke and rename devices")
    devices_sub = devices.add_subparsers(dest="devices_command", required=True)
    devices_list = devices_sub.add_parser("list", help="list devices")
    devices_list.add_argument("--user", help="only this user's devices")
    devices_list.add_argument("--all", action="store_true", help="include revoked devices")
    _json_flag(devices_list)
    _store_flags(devices_list)
    devices_list.set_defaults(handler=cmd_devices_list)
    revoke = devices_sub.add_parser("revoke", help="revoke a device: its credential and sessions stop working")
    revoke.add_argument("device", help="device id")
    _store_flags(revoke)
    revoke.set_defaults(handler=cmd_devices_revoke)
    rename = devices_sub.add_parser("rename", help="rename a device")
    rename.add_argument("device", help="device id")
    rename.add_argument("name", help="new name, 1-256 characters")
    _store_flags(rename)
    rename.set_defaults(handler=cmd_devices_rename)

    sessions = sub.add_parser("sessions", help="list and revoke sessions")
    sessions_sub = sessions.add_subparsers(dest="sessions_command", required=True)
    sessions_list = sessions_sub.add_parser("list", help="list sessions with their counters")
    sessions_list.add_argument("--user", help="only this user's sessions")
    sessions_list.add_argument("--device", help="only this device's sessions")
    _json_flag(sessions_list)
    _store_flags(sessions_list)
    sessions_list.set_defaults(handler=cmd_sessions_list)
    session_revoke = sessions_sub.add_parser("revoke", help="revoke a session")
    session_revoke.add_argument("session", help="session id")
    _store_flags(session_revoke)
    session_revoke.set_defaults(handler=cmd_sessions_revoke)


def _limit_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--limit", type=int, default=DEFAULT_LIST_LIMIT,
                        help=f"list at most this many {what} (default {DEFAULT_LIST_LIMIT})")


def _add_inbox_commands(sub: Any) -> None:
    inbox = sub.add_parser("inbox", help="list and purge a device's durable inbox")
    inbox_sub = inbox.add_subparsers(dest="inbox_command", required=True)
    inbox_list = inbox_sub.add_parser("list", help="a device's queued messages in delivery order, with the total")
    inbox_list.add_argument("device", help="device id")
    _limit_flag(inbox_list, "messages")
    inbox_list.add_argument("--json", action="store_true",
                            help="print a JSON object (device, count, bytes, messages) instead of a table")
    _store_flags(inbox_list)
    inbox_list.set_defaults(handler=cmd_inbox_list)
    inbox_purge = inbox_sub.add_parser("purge", help="delete a device's whole inbox (the senders are not told)")
    inbox_purge.add_argument("device", help="device id")
    _store_flags(inbox_purge)
    inbox_purge.set_defaults(handler=cmd_inbox_purge)

    dead = sub.add_parser("deadletters", help="list, redrive and purge dead letters")
    dead_sub = dead.add_subparsers(dest="deadletters_command", required=True)
    dead_list = dead_sub.add_parser("list", help="dead letters, oldest first, with reason and time")
    dead_list.add_argument("--user", help="only this user's dead letters")
    dead_list.add_argument("--device", help="only this device's dead letters")
    _limit_flag(dead_list, "dead letters")
    _json_flag(dead_list)
    _store_flags(dead_list)
    dead_list.set_defaults(handler=cmd_deadletters_list)
    redrive = dead_sub.add_parser(
        "redrive", help="move dead letters back to their inboxes with attempts reset",
        description="Move dead letters back to their inboxes with attempts reset: the ids given, or all of "
                    "--device's. All or nothing: an id that is not a dead letter refuses the whole command "
                    "(exit 2).")
    redrive.add_argument("ids", nargs="*", type=int, metavar="ID", help="dead letter id (see 'deadletters list')")
    redrive.add_argument("--device", help="all dead letters of this device")
    _store_flags(redrive)
    redrive.set_defaults(handler=cmd_deadletters_redrive)
    dead_purge = dead_sub.add_parser("purge", help="delete a device's dead letters")
    dead_purge.add_argument("--device", required=True, help="device id")
    _store_flags(dead_purge)
    dead_purge.set_defaults(handler=cmd_deadletters_purge)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rccs", description="rccs coordination server",
                     epilog="An id that starts with '-' may be given as it is (rccs devices revoke -dash); one that "
                            "spells an option of its command (-h, --json) goes after '--', with the options "
                            "before it: rccs devices revoke --data-dir DIR -- -h")
    parser.add_argument("--version", action=_VersionAction, help="print the version and fast-path implementation")
    sub = parser.add_subparsers(dest="command", required=True)  # subparsers are _Parser too (parser_class)
    serve = sub.add_parser("serve", help="run the server")
    _server_flags(serve)
    serve.set_defaults(handler=cmd_serve)

    token = sub.add_parser("token", help="device tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    issue = token_sub.add_parser("issue", help="print a signed device token on stdout (and register the device)")
    issue.add_argument("--user", required=True, help="user id")
    issue.add_argument("--device", required=True, help="device id (unique across users)")
    issue.add_argument("--ttl", default="30d", help="lifetime, e.g. 3600, 15m, 12h, 30d (default 30d)")
    issue.add_argument("--config", help="TOML settings file (also RCCS_CONFIG)")
    issue.add_argument("--data-dir", dest="data_dir", help="data directory holding the token secret and rccs.db")
    issue.add_argument("--store", help="sqlite (in --data-dir, the default) or the redis://HOST:PORT/DB of a "
                                       "cluster, which holds the cluster's token secret")
    issue.set_defaults(handler=cmd_token_issue)

    _add_registry_commands(sub)
    _add_inbox_commands(sub)
    _add_store_commands(sub)

    version = sub.add_parser("version", help="print the version and fast-path implementation")
    version.set_defaults(handler=cmd_version)
    return parser


def _version_line() -> str:
    from ._fastpath import IMPLEMENTATION  # on demand: only the version commands need the fast path here

    return f"rccs {__version__} (fastpath: {IMPLEMENTATION})"


def cmd_version(args: argparse.Namespace) -> int:
    print(_version_line())
    return 0


class _VersionAction(argparse.Action):
    """``rccs --version``: what ``rccs version`` prints, then exit 0 (as ``--help`` does)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(_version_line())
        parser.exit(0)


# What a shell reports for a process ended by SIGPIPE (128 + 13), as for 'ls | head -1' under pipefail.
BROKEN_PIPE_STATUS = 128 + signal.SIGPIPE


def _discard_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's final flush of what is still
    buffered for a reader that has gone does not print a second BrokenPipeError at exit."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without a descriptor (tests)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.handler(args)
        sys.stdout.flush()  # a reader that went away is noticed here, where it can be handled quietly
    except BrokenPipeError:
        # 'rccs devices list | head -1': the reader has what it wanted; stop without a word, as Unix tools do.
        _discard_stdout()
        return BROKEN_PIPE_STATUS
    except (ConfigError, TokenError, ValueError) as exc:
        print(f"rccs: error: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        # Not the caller's input but the store itself (e.g. a damaged or unreadable rccs.db).
        print(f"rccs: error: store: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # The environment, not the input: e.g. a --data-dir that cannot be created or read.
        where = f": {exc.filename}" if exc.filename is not None else ""
        print(f"rccs: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
