"""The event bus: what happened to devices, sessions and messages, told to whoever listens.

``EventBus.emit(kind, **fields)`` is cheap and never blocks: every subscriber
is a plain function called on the event loop. Subscribers that come with the
server: a counter per kind (metrics: ``rccs_events_total``), the structured
log (``rccs.events`` logger, one record per event with its fields), and, when
``webhook_url`` is set, ``Webhooks``: a bounded queue drained by one task that
POSTs each event as JSON, signed with HMAC-SHA256, retrying with exponential
backoff. A full queue drops the oldest event and counts it
(``rccs_webhook_events_total{result="dropped"}``): the server never waits for a
webhook receiver.

Event kinds are ``EVENT_KINDS``; docs/operations.md lists each with its fields
(tests/unit/test_wire_contract.py holds the two together).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from .clock import now_ms

log = logging.getLogger("rccs.events")

EVENT_KINDS = (
    "device.registered", "device.connected", "device.disconnected", "device.revoked", "session.expired",
    "message.failed", "message.expired", "message.dead_lettered", "pairing.completed", "task.handed_off",
)
WEBHOOK_RESULTS = ("delivered", "failed", "dropped")  # what became of a webhook event: rccs_webhook_events_total
SIGNATURE_HEADER = "X-Rccs-Signature"  # "sha256=" + hex HMAC-SHA256 of the body with webhook_secret
Subscriber = Callable[[dict[str, Any]], None]


class EventBus:
    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._subscribers: list[Subscriber] = [self._log]

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def emit(self, kind: str, **fields: Any) -> None:
        self.counts[kind] += 1
        event = {"event": kind, "at": now_ms(), **fields}
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception:  # one broken subscriber must not hurt the server or the others
                log.exception("event subscriber failed for %s", kind)

    @staticmethod
    def _log(event: dict[str, Any]) -> None:
        if log.isEnabledFor(logging.INFO):
            fields = {k: v for k, v in event.items() if k not in ("event", "at")}
            log.info("%s %s", event["event"], " ".join(f"{k}={v}" for k, v in fields.items()), extra=fields)


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Webhooks:
    """POSTs events to one URL, in order, one at a time, from a bounded queue."""

    def __init__(self, url: str, secret: str, kinds: set[str] | None, queue_size: int = 10000,
                 timeout: float = 5.0, retries: int = 5, backoff: float = 0.5):
        self.url = url
        self.secret = secret
        self.kinds = kinds
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.results: collections.Counter[str] = collections.Counter()  # by WEBHOOK_RESULTS
        self._queue: collections.deque[dict[str, Any]] = collections.deque(maxlen=queue_size)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __call__(self, event: dict[str, Any]) -> None:
        if self.kinds is not None and event["event"] not in self.kinds:
            return
        if len(self._queue) == self._queue.maxlen:
            self.results["dropped"] += 1
            log.warning("webhook queue full: dropping the oldest event")
        self._queue.append(event)
        self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, deadline: float = 5.0) -> None:
        """Try to send what is queued for up to ``deadline`` seconds, then stop."""
        if self._task is None:
            return
        end = time.monotonic() + deadline
        while self._queue and time.monotonic() < end:
            self._wakeup.set()
            await asyncio.sleep(0.05)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._queue:
            self.results["dropped"] += len(self._queue)
            log.warning("%d webhook events not sent at shutdown", len(self._queue))

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            event = self._queue[0]
            body = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
            delivered = await self._post_with_retries(body)
            if self._queue and self._queue[0] is event:
                self._queue.popleft()
            self.results["delivered" if delivered else "failed"] += 1

    async def _post_with_retries(self, body: bytes) -> bool:
        for attempt in range(self.retries + 1):
            if await asyncio.to_thread(self._post, body):  # a blocking client, off the event loop
                return True
            if attempt < self.retries:
                await asyncio.sleep(self.backoff * (2**attempt) * random.uniform(0.5, 1.0))
        log.error("webhook %s: event not accepted after %d attempts", self.url, self.retries + 1)
        return False

    def _post(self, body: bytes) -> bool:
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", SIGNATURE_HEADER: sign(self.secret, body),
            "User-Agent": "rccs-webhook"})
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return bool(200 <= response.status < 300)
        except (urllib.error.URLError, OSError, ValueError):
            return False
