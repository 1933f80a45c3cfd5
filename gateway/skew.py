"""This gateway's clock against the database's (PostgreSQL replicas).

Replicas sharing one database each place by their own clock what they write
there: the rate buckets an admission counts in, the local day its counters
are, a stream lease's expiry, a pending answer's admission time. Two replicas
whose clocks disagree count one minute as two (70 s apart,
``requests_per_minute = 3`` admitted 6 in a second). The database's clock is
the one they all share, so each gateway measures its own against it:
``SELECT clock_timestamp()`` bracketed by this clock before and after, the
offset taken against the midpoint and half the round trip its uncertainty
(`gateway.clock.Offset`).

It does so at start-up, where an offset past ``database.max_clock_offset``
stops the gateway with both clocks in the message, and before each periodic
recovery pass (``database.recover_interval``), where it logs an error instead
and keeps serving: a clock that drifts while replicas are up (or the
database's own clock jumping) would otherwise stop every replica at once,
refusing every user to protect a rate window (/readyz does not report it for
the same reason: a load balancer would take every replica out at once). The
offset is exported as ``gateway_clock_offset_seconds`` for an alert
(deploy/prometheus/alerts.yml); the cure is the machines' time service
(docs/deploy.md, "Clocks").

Recovery does not wait for this: gateway_recover takes a pending answer's age
on the database's clock as well as on the caller's (gateway/recovery.py).

SQLite is a file on this machine, with this machine's clock: nothing to measure.
"""

from __future__ import annotations

import logging

from gateway.clock import Clock, Offset
from gateway.errors import ClockError, StorageError
from gateway.metrics import Metrics
from gateway.storage import Health

log = logging.getLogger("gateway.skew")

OFFSET = "gateway_clock_offset_seconds"
# Readings taken at start-up; the one with the shortest round trip is kept (the
# least uncertain, as NTP keeps its best sample): the first query on a fresh
# connection may be slow.
START_SAMPLES = 3


class ClockWatch:
    def __init__(self, storage: Health, *, clock: Clock, metrics: Metrics, bound: float) -> None:
        self._storage = storage
        self._clock = clock
        self._metrics = metrics
        self.bound = bound  # database.max_clock_offset; 0: not checked
        self._past = False  # the last measure found the offset past the bound

    async def measure(self, samples: int = 1) -> Offset | None:
        """The database's clock minus ours (None on SQLite), exported as the gauge.
        Raises `StorageError` when the database does not answer."""
        best: Offset | None = None
        for _ in range(samples):
            sent = self._clock.now()
            remote = await self._storage.database_time()
            received = self._clock.now()
            if remote is None:
                return None
            offset = Offset.between(sent, remote, received)
            if best is None or offset.round_trip < best.round_trip:
                best = offset
        if best is not None:
            self._metrics.set_gauge(OFFSET, best.seconds)
        return best

    async def at_start(self) -> Offset | None:
        """Measure before the gateway serves; raises `ClockError` when the offset
        is past the bound. A database that does not answer this is logged: the
        periodic measure tries again."""
        try:
            offset = await self.measure(samples=START_SAMPLES)
        except StorageError as exc:
            log.warning("could not read the database's clock at start-up: %s", exc.message)
            return None
        if offset is None:
            return None
        if self.bound and offset.beyond(self.bound):
            raise ClockError(
                f"{describe(offset)}, more than database.max_clock_offset ({self.bound:g} s) "
                "allows: replicas placing rate windows, days and stream leases by clocks this "
                "far apart count them wrong, so the gateway does not start. Set this machine's "
                'time right (NTP: chrony or systemd-timesyncd, docs/deploy.md, "Clocks"), or '
                "raise database.max_clock_offset (0: not checked)"
            )
        log.info("%s", describe(offset))
        return offset

    async def check(self) -> Offset | None:
        """The periodic measure: an offset past the bound is logged as an error
        at each measure while it lasts, and its end once; the gateway keeps serving."""
        try:
            offset = await self.measure()
        except StorageError as exc:
            log.warning("could not read the database's clock (will retry): %s", exc.message)
            return None
        if offset is None:
            return None
        past = bool(self.bound) and offset.beyond(self.bound)
        if past:
            log.error(
                "%s, more than database.max_clock_offset (%g s): rate windows, days and "
                "stream leases are placed apart from other replicas'. Still serving; set this "
                'machine\'s time right (docs/deploy.md, "Clocks")',
                describe(offset),
                self.bound,
            )
        elif self._past:
            log.warning("%s: back within database.max_clock_offset", describe(offset))
        self._past = past
        return offset


def describe(offset: Offset) -> str:
    """Both clocks and the offset, in the words the log and the start refusal use."""
    side = "behind" if offset.seconds > 0 else "ahead of"
    return (
        f"this machine's clock ({offset.local.isoformat()}) is {abs(offset.seconds):.3f} s "
        f"{side} the database's ({offset.remote.isoformat()}), ± {offset.round_trip / 2:.3f} s"
    )
