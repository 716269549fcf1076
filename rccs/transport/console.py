"""The web console's files, served at ``/console/`` by the HTTP listener (README, "The web console").

The files are built from ``clients/js/console`` (``npm run build`` there) into ``rccs/console/`` and ship
in the wheel as package data. They are read once, when the server starts, into a table by name: a request
names one of those files or gets 404, so no path can reach anything else (no directory traversal, no
symlinks followed at request time). ``/console/config.json`` is made per request: it tells the page where
the WebSocket endpoint is (the ``public_url`` setting, else the port the page was not loaded from).

Every response says ``Cache-Control: no-cache`` with an ``ETag``: the file names carry no hash, so a
browser must check on each load, and an unchanged file costs a 304 without a body. A strict
Content-Security-Policy keeps the page to its own scripts and styles, and lets it connect only to
WebSocket endpoints and this origin.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
from collections.abc import Callable
from pathlib import Path

from .http import Handler, Request, Response, text_response

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
PREFIX = "/console/"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; "
                                "frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def load_files(directory: Path = CONSOLE_DIR) -> dict[str, tuple[bytes, str]]:
    """The console's files by name (``index.html``, ...): content and content type. Empty without a build."""
    files: dict[str, tuple[bytes, str]] = {}
    if not directory.is_dir():
        return files
    for path in sorted(directory.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            content_type = CONTENT_TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
            files[path.name] = (path.read_bytes(), content_type or "application/octet-stream")
    return files


def console_handler(ws_port: Callable[[], int], tls: bool, public_url: str,
                    files: dict[str, tuple[bytes, str]] | None = None) -> Handler:
    """The handler of ``/console`` and everything under ``/console/`` (GET and HEAD)."""
    table = load_files() if files is None else files

    async def handle(request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return text_response(405, "only GET is supported\n", (("Allow", "GET, HEAD"),))
        if request.path == "/console":
            return Response(301, b"", headers=(("Location", PREFIX),))
        name = request.path[len(PREFIX):] or "index.html"
        if name == "config.json":
            config = {"ws_url": public_url or None, "ws_port": ws_port(), "ws_path": "/v1", "tls": tls}
            body, content_type = json.dumps(config).encode(), "application/json"
        elif name in table:
            body, content_type = table[name]
        elif not table:
            return text_response(404, "the console is not built into this installation\n")
        else:
            return text_response(404, "not found\n")
        etag = _etag(body)
        headers = (("ETag", etag), ("Cache-Control", "no-cache"), *SECURITY_HEADERS)
        if etag in (tag.strip() for value in request.header("if-none-match") for tag in value.split(",")):
            return Response(304, b"", content_type, headers)
        return Response(200, body, content_type, headers)

    return handle
