"""Every Prometheus metric rccs exports, read from plain counters at scrape time.

The hot path never calls prometheus-client: it bumps the fast path's
``RouteStats`` counters and the hub's dict counters; ``HubCollector`` turns
them into metric families when ``/metrics`` is scraped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from ._fastpath import routing as fast_routing
from .events import WEBHOOK_RESULTS

if TYPE_CHECKING:
    from .hub import Hub

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HubCollector:
    """A prometheus-client custom collector over one hub."""

    def __init__(self, hub: Hub, pending_pairings: Callable[[], int]):
        self.hub = hub
        self.pending_pairings = pending_pairings

    def collect(self) -> Iterator[Any]:
        hub = self.hub
        info = GaugeMetricFamily("rccs_info", "Server version, fast-path implementation and node name",
                                 labels=["version", "implementation", "node"])
        server = hub.server_info()
        info.add_metric([server["version"], server["implementation"], server["node"]], 1)
        yield info

        connections = GaugeMetricFamily("rccs_connections", "Authenticated connections by device type",
                                        labels=["device_type"])
        for device_type, count in sorted(hub.routing.count_by_type().items()):
            connections.add_metric([device_type], count)
        yield connections
        yield GaugeMetricFamily("rccs_connections_open", "Open WebSocket connections, with or without hello",
                                value=hub.connection_count)

        snapshot: dict[str, Any] = hub.stats.snapshot()
        routed = CounterMetricFamily("rccs_messages_routed", "send operations by routing result",
                                     labels=["result"])
        for result, count in snapshot["results"].items():
            routed.add_metric([result], count)
        yield routed

        buckets = []
        cumulative = 0
        for bound, count in zip(fast_routing.LATENCY_BUCKETS_US, snapshot["latency_buckets"], strict=False):
            cumulative += count
            buckets.append((repr(bound / 1e6), cumulative))
        cumulative += snapshot["latency_buckets"][-1]
        buckets.append(("+Inf", cumulative))
        yield HistogramMetricFamily("rccs_routing_latency_seconds",
                                    "Server-side time from a send frame's arrival to its last receiver write",
                                    buckets=buckets, sum_value=snapshot["latency_sum_ns"] / 1e9)

        frames = CounterMetricFamily("rccs_messages", "Messages counted by the router", labels=["direction"])
        frames.add_metric(["in"], snapshot["frames_in"])
        frames.add_metric(["out"], snapshot["frames_out"])
        yield frames

        errors = CounterMetricFamily("rccs_errors", "error envelopes sent, by code", labels=["code"])
        for code, count in sorted(hub.errors_sent.items()):
            errors.add_metric([code], count)
        yield errors

        closes = CounterMetricFamily("rccs_closes", "Connections closed by the server, by close code",
                                     labels=["code"])
        for close_code, count in sorted(hub.closes_sent.items()):
            closes.add_metric([str(close_code)], count)
        yield closes

        yield CounterMetricFamily("rccs_rate_limited_messages",
                                  "Messages refused over a device's send rate (only the first of a streak is answered)",
                                  value=hub.rate_refused)
        yield CounterMetricFamily("rccs_receipts_undeliverable",
                                  "Receipts their sender device was offline for: kept in the store, "
                                  "sent after its next welcome",
                                  value=hub.receipts_undeliverable)
        traffic = list(hub.closed_traffic)
        for session in hub.sessions:
            sink = session.sink
            traffic[0] += sink.frames_in
            traffic[1] += sink.frames_out
            traffic[2] += sink.bytes_in
            traffic[3] += sink.bytes_out
        messages = CounterMetricFamily("rccs_session_messages", "WebSocket messages of all sessions",
                                       labels=["direction"])
        messages.add_metric(["in"], traffic[0])
        messages.add_metric(["out"], traffic[1])
        yield messages
        payload = CounterMetricFamily("rccs_session_bytes", "WebSocket payload bytes of all sessions",
                                      labels=["direction"])
        payload.add_metric(["in"], traffic[2])
        payload.add_metric(["out"], traffic[3])
        yield payload
        sessions = GaugeMetricFamily("rccs_sessions", "Sessions: connected, or dropped and still resumable",
                                     labels=["state"])
        sessions.add_metric(["connected"], len(hub.live))
        sessions.add_metric(["resumable"], len(hub.detached))
        yield sessions
        events = CounterMetricFamily("rccs_events", "Session, device and pairing events", labels=["event"])
        for event, count in sorted(hub.events.items()):
            events.add_metric([event], count)
        yield events
        bus_events = CounterMetricFamily("rccs_bus_events", "Events on the event bus (and webhooks), by kind",
                                         labels=["kind"])
        for kind, count in sorted(hub.bus.counts.items()):
            bus_events.add_metric([kind], count)
        yield bus_events
        if hub.webhooks is not None:
            webhook = CounterMetricFamily("rccs_webhook_events", "Webhook deliveries by result", labels=["result"])
            for result in WEBHOOK_RESULTS:
                webhook.add_metric([result], hub.webhooks.results[result])
            yield webhook
        yield GaugeMetricFamily("rccs_devices_registered", "Registered devices that are not revoked",
                                value=sum(1 for d in hub.registry.devices.values() if d.revoked_at is None))
        yield GaugeMetricFamily("rccs_pairing_requests_pending", "Redeemed pairing codes awaiting approval",
                                value=self.pending_pairings())
        yield GaugeMetricFamily("rccs_uptime_seconds", "Seconds since the server started",
                                value=time.time() - hub.started_at)


def build_registry(hub: Hub, pending_pairings: Callable[[], int]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(hub, pending_pairings))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
