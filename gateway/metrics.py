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
        "Answers whose id was already in the ledger (not counted again).",
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
    "gateway_settle_retries_total": ("Ledger writes retried after a storage error.", ()),
    "gateway_settle_spooled_total": (
        "Ledger writes spooled to the local file after retries failed.",
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
GAUGES: Mapping[str, tuple[str, tuple[str, ...], Literal["livesum"]]] = {
    "gateway_streams_in_flight": (
        "Streamed answers being relayed now.",
        (),
        # Summed over the live workers only: a dead worker's streams are gone.
        "livesum",
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


class Metrics:
    """One gateway's metrics in a registry of its own (several gateways may live
    in one process, as in tests; in multiprocess mode they share the files)."""

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
        self._children: dict[tuple[Any, ...], Any] = {}
        self._in_flight = self._gauges["gateway_streams_in_flight"].track_inprogress()
        # The spool's size (SpoolSize above); its path is set by the settler.
        self.spool = SpoolSize()
        r.register(self.spool)

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        if not labels:
            self._counters[name].inc(amount)
            return
        key = (name, *labels.items())
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._counters[name].labels(**labels)
        child.inc(amount)

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        if not labels:
            self._histograms[name].observe(seconds)
            return
        key = (name, *labels.items())
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._histograms[name].labels(**labels)
        child.observe(seconds)

    def streaming(self, active: bool) -> contextlib.AbstractContextManager[None]:
        """Count a streamed answer in flight while it is relayed (if ``active``)."""
        return self._in_flight if active else _NOT_STREAMING

    def get(self, name: str, **labels: str) -> float:
        """This process's value of a counter (or gauge), 0 if never counted."""
        value = self.registry.get_sample_value(name, labels)
        return 0 if value is None else value

    def render(self) -> bytes:
        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=path)  # type: ignore[no-untyped-call]
        merged.register(self.spool)  # read from disk, not from the workers' files
        return generate_latest(merged)

    def close(self) -> None:
        """This process is going away: its live gauges no longer count."""
        path = multiprocess_dir()
        if path is not None:
            mark_process_dead(os.getpid(), path)  # type: ignore[no-untyped-call]
