"""The /metrics page: the pool's snapshot (rotator.status.document) as Prometheus metrics.

prometheus_client writes the text format (and OpenMetrics, when a scraper asks for it)
with its escaping; a private registry holds one custom collector that reads a fresh
snapshot on every scrape, so nothing is counted twice and no global state is touched.
Keys are labelled by index, name and masked key, never the key itself.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from rotator.status.document import Snapshot, SnapshotSource

PREFIX = "kimi_rotator_"
KEY_LABELS = ("index", "name", "masked_key")


class PoolCollector:
    """A prometheus_client collector over `read()`, called once per scrape."""

    def __init__(self, read: SnapshotSource) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        return iter(families(self.read()))


def families(shot: Snapshot) -> list[Metric]:
    def family(kind: type, name: str, doc: str, *extra: str) -> Metric:
        return kind(PREFIX + name, doc, labels=[*KEY_LABELS, *extra])

    requests = family(CounterMetricFamily, "key_requests", "Attempts on the key by outcome, since this proxy started", "outcome")
    retries = family(CounterMetricFamily, "key_retries", "Resends of a refused request that went to the key, since start")
    in_flight = family(GaugeMetricFamily, "key_in_flight", "Requests on the key waiting for Kimi's answer")
    cap = family(GaugeMetricFamily, "key_in_flight_cap", "Requests the key may have in flight (the proxy's cap or Kimi's parallel limit)")
    sessions = family(GaugeMetricFamily, "key_sessions", "Live conversations pinned to the key (conversation affinity)")
    health = family(GaugeMetricFamily, "key_health", "The key's health score, 0 to 100, resting recovery included")
    until = family(GaugeMetricFamily, "key_seconds_until_usable", "Seconds until a cooling key may serve; 0 if usable, +Inf if disabled")
    state = family(GaugeMetricFamily, "key_state", "1, labelled with the key's state (serving, ready, half-open, cooling, disabled)", "state")
    quota = family(GaugeMetricFamily, "key_quota_remaining_ratio", "Share of the window's quota left, per Kimi's latest /usages reading", "window")
    tokens = family(CounterMetricFamily, "key_tokens", "Tokens Kimi reported the key spent, since it was added (every process), by kind", "kind")
    quota_reset = family(GaugeMetricFamily, "key_quota_reset_seconds", "Seconds until the window's quota resets, per the latest reading", "window")
    for row in shot.keys:
        labels = [str(row.index), row.name, row.masked_key]
        for outcome, count in sorted(row.outcomes.items()):
            requests.add_metric([*labels, outcome], count)
        retries.add_metric(labels, row.retries)
        in_flight.add_metric(labels, row.in_flight)
        cap.add_metric(labels, row.cap)
        health.add_metric(labels, row.health)
        sessions.add_metric(labels, row.sessions)
        until.add_metric(labels, row.seconds_until_usable(shot.now))
        state.add_metric([*labels, row.state], 1)  # one series per key: a scrape of 1,000 keys stays cheap
        spent = row.tokens
        for kind, count in (("input", spent.input), ("output", spent.output), ("cache_read", spent.cache_read),
                            ("cache_write", spent.cache_write)):
            tokens.add_metric([*labels, kind], count)
        for window in row.windows:
            ratio = window.remaining_ratio()
            if ratio is not None:
                quota.add_metric([*labels, window.name], ratio)
            if window.reset_time:
                quota_reset.add_metric([*labels, window.name], max(0.0, (window.reset_time - shot.now) / 1000))
    refused = CounterMetricFamily(
        PREFIX + "refused", "Answers the proxy gave itself instead of Kimi's, by reason, since start", labels=["reason"]
    )
    for reason, count in sorted(shot.refused.items()):
        refused.add_metric([reason], count)
    keys = GaugeMetricFamily(PREFIX + "keys", "Keys in the pool")
    keys.add_metric([], len(shot.keys))
    paused = GaugeMetricFamily(PREFIX + "paused_seconds", "Seconds left of the pause shared by every key (Kimi throttling this client)")
    paused.add_metric([], shot.paused_seconds)
    return [requests, retries, in_flight, cap, sessions, health, until, state, tokens, quota, quota_reset, refused, keys,
            paused]


def registry(read: SnapshotSource) -> CollectorRegistry:
    """A private registry holding only the pool's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(read))
    return registry


def render_snapshot(shot: Snapshot, accept: str = "") -> tuple[bytes, str]:
    """`render` of one snapshot (safe in a worker thread: a snapshot is never changed)."""
    return render(registry(lambda: shot), accept)


def render(registry: CollectorRegistry, accept: str = "") -> tuple[bytes, str]:
    """The page's body and content type for a scraper's Accept header."""
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type
