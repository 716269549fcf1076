"""The HTTP side: ``/healthz``, ``/readyz`` and ``/metrics``.

Served by picows as plain GET responses (a listener factory may answer a
request with any HTTP response instead of upgrading it), so the whole server
runs on one transport library. Only GET without a body is supported, which is
all these endpoints need.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from picows import WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener

from ..metrics import CONTENT_TYPE, render

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from ..hub import Hub


def _respond(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> Any:
    headers = {"Content-Type": content_type, "Cache-Control": "no-store"}
    if status == 200:
        response = WSUpgradeResponse.create_ok_response(body, extra_headers=headers)
    else:
        response = WSUpgradeResponse.create_error_response(status, body, extra_headers=headers)
    return WSUpgradeResponseWithListener(response, None)


def http_router(hub: Hub, registry: CollectorRegistry, is_ready: Callable[[], bool]) -> Callable[[Any], Any]:
    def route(request: WSUpgradeRequest) -> Any:
        path = request.path.split(b"?", 1)[0]
        if request.method != b"GET":
            return _respond(405, b"only GET is supported\n")
        if path == b"/healthz":
            return _respond(200, b"ok\n")
        if path == b"/readyz":
            if is_ready():
                return _respond(200, b"ready\n")
            return _respond(503, b"not ready\n")
        if path == b"/metrics":
            return _respond(200, render(registry), CONTENT_TYPE)
        return _respond(404, b"not found\n")

    return route
