"""``rccs`` command line: ``serve``, ``token issue``, ``version``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from . import __version__
from .auth import TokenAuthority, TokenError, load_or_create_secret, parse_duration
from .config import ConfigError, Settings, load_settings


def _server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML settings file (also RCCS_CONFIG)")
    parser.add_argument("--host", help="WebSocket listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="WebSocket port, 0 picks a free one (default 8765)")
    parser.add_argument("--http-host", dest="http_host", help="HTTP listen address (default 127.0.0.1)")
    parser.add_argument("--http-port", dest="http_port", type=int, help="HTTP port (default 8766)")
    parser.add_argument("--data-dir", dest="data_dir", help="directory for the token secret (default ./rccs-data)")
    parser.add_argument("--heartbeat", type=float, help="seconds of silence before a ping (default 30)")
    parser.add_argument("--hello-timeout", dest="hello_timeout", type=float, help="seconds to say hello (default 10)")
    parser.add_argument("--max-message-bytes", dest="max_message_bytes", type=int,
                        help="largest accepted WebSocket message (default 1048576)")
    parser.add_argument("--max-connections", dest="max_connections", type=int, help="default 10000")
    parser.add_argument("--max-outbound-bytes", dest="max_outbound_bytes", type=int,
                        help="unsent bytes per connection before it is dropped as too slow (default 8 MiB)")
    parser.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING, ERROR (default INFO)")


def _settings(args: argparse.Namespace) -> Settings:
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
    logging.getLogger("rccs").info("signal received, shutting down")
    await node.stop()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    settings = _settings(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # picows logs every accepted connection at INFO; keep that for DEBUG runs.
        logging.getLogger("picows").setLevel(logging.WARNING)
    uvloop.run(_serve(settings))
    return 0


def cmd_token_issue(args: argparse.Namespace) -> int:
    settings = _settings(args)
    secret = settings.token_secret.encode() if settings.token_secret else load_or_create_secret(settings.data_dir)
    ttl = parse_duration(args.ttl)
    print(TokenAuthority(secret).issue(args.user, args.device, ttl))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rccs", description="rccs coordination server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    _server_flags(serve)
    serve.set_defaults(handler=cmd_serve)

    token = sub.add_parser("token", help="device tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    issue = token_sub.add_parser("issue", help="print a signed device token on stdout")
    issue.add_argument("--user", required=True, help="user id")
    issue.add_argument("--device", required=True, help="device id (unique across users)")
    issue.add_argument("--ttl", default="30d", help="lifetime, e.g. 3600, 15m, 12h, 30d (default 30d)")
    issue.add_argument("--config", help="TOML settings file (also RCCS_CONFIG)")
    issue.add_argument("--data-dir", dest="data_dir", help="data directory holding the token secret")
    issue.set_defaults(handler=cmd_token_issue)

    version = sub.add_parser("version", help="print the version and fast-path implementation")
    version.set_defaults(handler=cmd_version)
    return parser


def cmd_version(args: argparse.Namespace) -> int:
    from ._fastpath import IMPLEMENTATION

    print(f"rccs {__version__} (fastpath: {IMPLEMENTATION})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.handler(args)
    except (ConfigError, TokenError, ValueError) as exc:
        print(f"rccs: error: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
