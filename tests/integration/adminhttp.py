"""A small blocking HTTP client for the HTTP port (health, metrics, admin API), used from tests via threads."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import ssl
import urllib.parse
from typing import Any

KEY = "test-admin-key-0123456789"


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON for application/json, else text
    raw: bytes

    @property
    def error_code(self) -> str | None:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return self.body["error"].get("code")
        return None


def connection(base: str, context: ssl.SSLContext | None = None, timeout: float = 5) -> http.client.HTTPConnection:
    url = urllib.parse.urlsplit(base)
    if url.scheme == "https":
        return http.client.HTTPSConnection(url.hostname, url.port, context=context, timeout=timeout)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)


def exchange(conn: http.client.HTTPConnection, method: str, path: str, body: Any = None, key: str | None = KEY,
             headers: dict[str, str] | None = None) -> Reply:
    """One request on ``conn`` (kept alive unless the server closes it)."""
    sent = dict(headers or {})
    if key is not None:
        sent.setdefault("Authorization", f"Bearer {key}")
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    if data is not None:
        sent.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=data, headers=sent)
    response = conn.getresponse()
    raw = response.read()
    reply_headers = {name.lower(): value for name, value in response.getheaders()}
    parsed: Any = raw.decode("utf-8", "replace")
    if reply_headers.get("content-type") == "application/json" and raw:
        parsed = json.loads(raw)
    if response.will_close:
        conn.close()
    return Reply(response.status, reply_headers, parsed, raw)


def request(base: str, method: str, path: str, body: Any = None, key: str | None = KEY,
            headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None) -> Reply:
    conn = connection(base, context)
    try:
        return exchange(conn, method, path, body, key, headers)
    finally:
        conn.close()


async def api(server: Any, method: str, path: str, body: Any = None, **options: Any) -> Reply:
    """``request`` against a running server, from a worker thread (the server runs on this loop)."""
    return await asyncio.to_thread(request, server.http_url, method, path, body, **options)
