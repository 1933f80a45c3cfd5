"""The gateway's Prometheus metrics, declared once as prometheus_client objects.

Every metric the gateway exports is declared in the tables below: a name that
is not declared cannot be counted (``inc`` raises), so no metric can be counted
and never exported. See docs/metrics.md for what each one means.

Under ``gateway serve --workers N`` the workers are separate processes: each
writes its values to files in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's
multiprocess mode, set up by the CLI) and /metrics, answered by any worker,
sums them all.
"""

from __future__ import annotations

import bisect
import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# name -> (help, label names)
COUNTERS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "gateway_requests_total": (
        "Requests handled by the proxy, by route kind and status class.",
        ("route", "status"),
    ),
    "gateway_refusals_total": ("Requests refused by the gateway, by code.", ("code",)),
    "gateway_answers_settled_total": ("Answers recorded in the ledger, by outcome.", ("outcome",)),
    "gateway_answers_duplicate_total": (
        "Records of an answer already in the ledger (not counted again).",
        (),
    ),
    "gateway_usage_estimated_total": (
        "Answers charged by estimate because the upstream reported no usage.",
        (),
    ),
    "gateway_usage_clamped_total": (
        "Answers whose reported numbers were out of range and were recorded clamped.",
        (),
    ),
    # Review D2: a paid call an answer made, with no price to charge it at.
    "gateway_unpriced_calls_total": (
        "Paid side calls answers made that no call price covers (recorded without them), "
        "by upstream and call.",
        ("upstream", "call"),
    ),
    "gateway_settle_retries_total": ("Ledger writes retried after a storage error.", ()),
    "gateway_settle_spooled_total": (
        "Ledger writes and give-backs spooled to the local file after retries failed.",
        (),
    ),
    "gateway_settle_lost_total": (
        "Usage records (and give-backs) neither written nor spooled (no spool file, or it "
        "could not be written): each is in the log whole, as LOST usage record (give-back).",
        (),
    ),
    "gateway_settle_rejected_total": (
        "Usage records the database refused for good (their user gone), kept in "
        "the spool's .rejected file and the log.",
        (),
    ),
    "gateway_storage_errors_total": (
        "Storage errors on the request path, by operation.",
        ("operation",),
    ),
    "gateway_upstream_errors_total": ("Upstream failures, by kind.", ("kind",)),
    # Issue 23: each request sent to a named upstream, and each move to a fallback.
    "gateway_upstream_attempts_total": (
        "Requests sent to each upstream, by outcome (answered, rate_limited, "
        "server_error, timeout, unreachable).",
        ("upstream", "outcome"),
    ),
    "gateway_upstream_fallbacks_total": (
        "Requests sent on to a fallback upstream after one failed before answering.",
        ("from", "to"),
    ),
    "gateway_upstream_abandoned_total": (
        "Requests an upstream took (then timed out or disconnected before its headers) "
        "that were sent on to a fallback (fallback_after_timeout): possibly billed, "
        "unrecorded.",
        ("upstream",),
    ),
    "gateway_client_disconnects_total": ("Clients that left before the answer ended.", ()),
    "gateway_answers_recovered_total": (
        "Pending answers of a gateway that died, charged by estimate.",
        (),
    ),
    "gateway_answers_cut_at_shutdown_total": (
        "Answers still open when the shutdown grace ran out.",
        (),
    ),
    "gateway_config_reloads_total": ("Configuration reloads, by result.", ("result",)),
    "gateway_web_search_count_failures_total": (
        "Answers whose web searches could not be counted at admission.",
        (),
    ),
    "gateway_admission_storage_failures_total": (
        "Admissions decided without the database, by failure policy.",
        ("policy",),
    ),
    "gateway_alert_deliveries_total": (
        "Alert delivery attempts, by channel and result (delivered, retry, failed, unrecorded).",
        ("channel", "result"),
    ),
    "gateway_tokens_total": (
        "Tokens recorded in the ledger, by plan, model and kind (prompt or completion).",
        ("plan", "model", "kind"),
    ),
    "gateway_cost_total": (
        "Cost recorded in the ledger, by plan, model and currency.",
        ("plan", "model", "currency"),
    ),
}

# Seconds: from a millisecond of gateway work to a long answer.
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_SLOW = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

HISTOGRAMS: Mapping[str, tuple[str, tuple[str, ...], tuple[float, ...]]] = {
    "gateway_time_to_first_byte_seconds": (
        "From a request's arrival to the first byte of its answer sent to the client.",
        ("route",),
        _SLOW,
    ),
    "gateway_overhead_seconds": (
        "Time the gateway adds before a request is sent upstream (auth, body, admission).",
        ("route",),
        _FAST,
    ),
    "gateway_upstream_seconds": (
        "From sending an answer request upstream to the end of its answer.",
        ("route",),
        _SLOW,
    ),
    "gateway_admission_seconds": ("Latency of admitting an answer request.", (), _FAST),
    "gateway_settle_seconds": ("Latency of recording an answer in the ledger.", (), _FAST),
}

# name -> (help, label names, multiprocess mode)
GAUGES: Mapping[str, tuple[str, tuple[str, ...], Literal["livesum", "livemostrecent"]]] = {
    "gateway_streams_in_flight": (
        "Streamed answers being relayed now.",
        (),
        # Summed over the live workers only: a dead worker's streams are gone.
        "livesum",
    ),
    "gateway_clock_offset_seconds": (
        "The database's clock minus this gateway's, as last measured (PostgreSQL; 0 on SQLite).",
        (),
        # Every worker of a process measures the same machine's clock: the
        # latest reading of a live one.
        "livemostrecent",
    ),
}


# --- deployment kit (issue 25): the spool's size, read from disk at each scrape ---
# The spool (database.spool_file) holds the usage records the database would not
# take, until a restart replays them: records not yet counted against anyone's
# limits. gateway_settle_spooled_total says records went there in this process's
# life; only the file says how many still wait, also after a restart or across
# workers and replicas sharing it, so the size is read from the file when
# /metrics is scraped rather than counted.
SPOOL_BYTES = "gateway_spool_bytes"
SPOOL_BYTES_HELP = (
    "Size of the spool file (usage records waiting for replay at the next start), in bytes."
)


class SpoolSize(Collector):
    def __init__(self) -> None:
        self.path: Path | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(SPOOL_BYTES, SPOOL_BYTES_HELP, value=spool_bytes(self.path))


def spool_bytes(path: Path | None) -> int:
    """The spool file and any replay of it still under way (``NAME.*.replaying``)."""
    if path is None:
        return 0
    total = 0
    for file in [path, *path.parent.glob(f"{path.name}.*.replaying")]:
        with contextlib.suppress(OSError):  # absent (nothing spooled) or just replayed
            total += file.stat().st_size
    return total


# --- end of deployment kit ---


_NOT_STREAMING: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class _Streaming:
    """``Metrics.streaming``'s context: the in-flight gauge moved by the pending
    deltas (one process) or at once (several)."""

    __slots__ = ("_metrics",)

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def __enter__(self) -> None:
        self._metrics.inc_gauge(_IN_FLIGHT, 1)

    def __exit__(self, *exc: object) -> None:
        self._metrics.inc_gauge(_IN_FLIGHT, -1)


_IN_FLIGHT = "gateway_streams_in_flight"


class Metrics:
    """One gateway's metrics in a registry of its own (several gateways may live
    in one process, as in tests; in multiprocess mode they share the files).

    In one process (no ``PROMETHEUS_MULTIPROC_DIR``) the hot path's counts and
    observations are summed in plain dicts and handed to prometheus_client when
    they are read (`render`, `get`): prometheus_client takes a lock and checks
    its arguments on every ``inc``, and walks the buckets on every ``observe``,
    about five microseconds each, a dozen times per answer. Each pending sum
    goes to prometheus_client as one ``inc`` (a histogram's as one ``inc`` of
    its sum and one per bucket it reached), so what is read is exactly what
    was counted. Names and labels are still checked on their first use, so an
    undeclared one raises at once. Under several workers every value is
    written through at once, as before: another worker reads it from the files.
    Used from the event loop's thread only (as the gateway does).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._counters = {
            name: Counter(name, text, labels, registry=r)
            for name, (text, labels) in COUNTERS.items()
        }
        self._histograms = {
            name: Histogram(name, text, labels, buckets=buckets, registry=r)
            for name, (text, labels, buckets) in HISTOGRAMS.items()
        }
        self._gauges = {
            name: Gauge(name, text, labels, multiprocess_mode=mode, registry=r)
            for name, (text, labels, mode) in GAUGES.items()
        }
        # The labelled children already looked up, by name and labels: prometheus'
        # ``labels()`` checks and sorts the label names and takes a lock on every
        # call, and the proxy counts about ten times per request. The set of label
        # values is the one prometheus_client keeps a child for anyway.
        self._children: dict[str, dict[tuple[Any, ...], Any]] = {
            "counter": {},
            "histogram": {},
            "gauge": {},
        }
        self._counter_children = self._children["counter"]
        self._histogram_children = self._children["histogram"]
        # What was counted and not yet handed to prometheus_client (one process):
        # a counter's or gauge's child -> the sum; a histogram's child -> its sum
        # and its count per bucket.
        self._deferred = multiprocess_dir() is None
        self._counts: dict[Any, float] = {}
        self._observed: dict[Any, _Observed | None] = {}
        self._streaming = _Streaming(self)
        # The spool's size (SpoolSize above); its path is set by the settler.
        self.spool = SpoolSize()
        r.register(self.spool)

    def _child(self, kind: str, name: str, labels: dict[str, str]) -> Any:
        """The metric's child for these labels (the metric itself without labels),
        looked up once: an undeclared name, or a label missing or not declared,
        raises here."""
        key = (name, *labels.items())
        children = self._children[kind]
        child = children.get(key)
        if child is None:
            metric: Any
            if kind == "counter":
                metric, declared = self._counters[name], COUNTERS[name][1]
            elif kind == "histogram":
                metric, declared = self._histograms[name], HISTOGRAMS[name][1]
            else:
                metric, declared = self._gauges[name], GAUGES[name][1]
            if declared and not labels:
                raise ValueError(f"{name} is counted with its labels {declared}")
            child = metric.labels(**labels) if labels else metric
            children[key] = child
        return child

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        child = self._counter_children.get((name, *labels.items()))
        if child is None:
            child = self._child("counter", name, labels)
        if not self._deferred:
            child.inc(amount)
            return
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        counts = self._counts
        counts[child] = counts.get(child, 0) + amount

    def inc_gauge(self, name: str, amount: float) -> None:
        """Move a gauge (with no labels) by ``amount``."""
        child = self._children["gauge"].get((name,))
        if child is None:
            child = self._child("gauge", name, {})
        if not self._deferred:
            child.inc(amount)
            return
        counts = self._counts
        counts[child] = counts.get(child, 0) + amount

    def set_gauge(self, name: str, value: float) -> None:
        """Set a gauge (with no labels) to ``value``: a reading, not a count."""
        self._child("gauge", name, {}).set(value)

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        child = self._histogram_children.get((name, *labels.items()))
        if child is None:
            child = self._child("histogram", name, labels)
        if self._deferred:
            observed = self._observed.get(child, _UNSEEN)
            if observed is _UNSEEN:
                observed = self._observed[child] = _Observed.of(child)
            if observed is not None:
                observed.add(seconds)
                return
        child.observe(seconds)

    def flush(self) -> None:
        """Hand what was counted to prometheus_client (done before it is read)."""
        counts, self._counts = self._counts, {}
        for child, amount in counts.items():
            child.inc(amount)
        for observed in self._observed.values():
            if observed is not None:
                observed.flush()

    def streaming(self, active: bool) -> contextlib.AbstractContextManager[None]:
        """Count a streamed answer in flight while it is relayed (if ``active``)."""
        return self._streaming if active else _NOT_STREAMING

    def get(self, name: str, **labels: str) -> float:
        """This process's value of a counter (or gauge), 0 if never counted."""
        self.flush()
        value = self.registry.get_sample_value(name, labels)
        return 0 if value is None else value

    def render(self) -> bytes:
        self.flush()
        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=path)  # type: ignore[no-untyped-call]
        merged.register(self.spool)  # read from disk, not from the workers' files
        return generate_latest(merged)

    def close(self) -> None:
        """This process is going away: its live gauges no longer count."""
        self.flush()
        path = multiprocess_dir()
        if path is not None:
            mark_process_dead(os.getpid(), path)  # type: ignore[no-untyped-call]


class _Observed:
    """A histogram child's observations not yet handed over: their sum and how
    many fell in each bucket (prometheus_client's rule: the first upper bound
    the value is at or under; NaN is under none)."""

    __slots__ = ("_bounds", "_buckets", "_child", "_sum")

    def __init__(self, child: Any, bounds: list[float]) -> None:
        self._child = child
        self._bounds = bounds
        self._buckets = [0] * len(bounds)
        self._sum = 0.0

    @classmethod
    def of(cls, child: Any) -> _Observed | None:
        """None when this prometheus_client keeps its buckets otherwise than it
        has since 0.4 (``_upper_bounds``, ``_buckets``, ``_sum``): then each value
        is observed at once."""
        bounds = getattr(child, "_upper_bounds", None)
        buckets = getattr(child, "_buckets", None)
        if not (
            isinstance(bounds, list)
            and isinstance(buckets, list)
            and len(bounds) == len(buckets)
            and hasattr(getattr(child, "_sum", None), "inc")
        ):
            return None
        return cls(child, [float(bound) for bound in bounds])

    def add(self, value: float) -> None:
        self._sum += value
        if value == value:  # not NaN
            self._buckets[bisect.bisect_left(self._bounds, value)] += 1

    def flush(self) -> None:
        if not any(self._buckets) and not self._sum:
            return
        child = self._child
        child._sum.inc(self._sum)
        self._sum = 0.0
        buckets = child._buckets
        for at, count in enumerate(self._buckets):
            if count:
                buckets[at].inc(count)
                self._buckets[at] = 0


_UNSEEN: Any = object()
