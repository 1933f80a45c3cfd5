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
