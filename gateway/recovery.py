"""Recovering answers whose gateway died before it could settle them.

Admission writes a pending row for every answer it admits (docs/quotas.md,
"Crash safety"); settle or refund removes it. A row still there long after the
longest an answer can take belongs to a gateway that was killed (kill -9, OOM, a
lost machine): any gateway charges it as the estimate the row carries, marked
estimated with the outcome "recovered". Every gateway does this at start-up and
then periodically; the storage shares the rows out between replicas, so none is
charged twice and none is left.

The gateway may not have died: during a long database outage its finished
answers wait in the spool while their pending rows look abandoned. So the
estimate is provisional: the answer's real record, when it is replayed, takes
its place in the ledger (linked by the pending row's id, which is the request
id: the estimate is ledger row ``gw-<request id>``), and the totals move by the
difference - once (docs/quotas.md, "Crash safety").

A pending row carries the admitting gateway's time and each replica judges its
age by its own clock: one whose clock ran ahead of the admitter's by more than
``after`` would charge answers still streaming (and keep the charge of one that
then failed). So on PostgreSQL the age is also taken on the database's clock,
in the recovery's own statement (gateway_recover: the row must be older than
``after`` by both clocks: the earlier of the two cutoffs). That is
exact where a measured offset would be a minute old, and needs no measure at
all. What it leaves is the admitter's side: a replica whose clock is behind the
database's writes rows that look older than they are, by that offset; its
start-up refuses an offset past ``database.max_clock_offset`` and the periodic
measure logs and exports one that grows later (gateway/skew.py), and
``recover_after`` keeps a minute to spare by default. SQLite is one machine,
one clock.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from gateway.clock import Clock
from gateway.metrics import Metrics
from gateway.storage import Accounting

log = logging.getLogger("gateway.recovery")

# Pending answers recovered per storage call: bounds how long one call holds the
# row locks of the users it touches.
BATCH = 100


class Recovery:
    def __init__(self, storage: Accounting, *, clock: Clock, metrics: Metrics, after: timedelta):
        self._storage = storage
        self._clock = clock
        self._metrics = metrics
        self.after = after  # a pending answer older than this is taken for lost

    async def run_once(self) -> int:
        """Recover every pending answer older than ``after``; returns how many."""
        total = 0
        while True:
            now = self._clock.now()
            ids = await self._storage.recover(before=now - self.after, now=now, limit=BATCH)
            total += len(ids)
            for pending_id in ids:
                log.warning(
                    "request %s: its gateway never settled it; charged the estimate made "
                    "at admission (outcome recovered) until a real record replaces it",
                    pending_id,
                )
            if len(ids) < BATCH:
                break
        if total:
            self._metrics.inc("gateway_answers_recovered_total", total)
            log.warning("recovered %d pending answer(s) left by a gateway that died", total)
        return total
