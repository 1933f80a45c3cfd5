"""What the gateway's own endpoints use: the admin API, the usage API, the
dashboard, /readyz and /metrics.

One `Services` is built by `Gateway.start` (gateway/runtime.py) and put on the
Starlette app's state (``request.app.state.services``); the endpoints take what
they need from it and nothing of the gateway's lifecycle. The configuration is
read from the snapshot in force (gateway/snapshot.py) when asked for.
"""

from __future__ import annotations

import dataclasses
from datetime import date
from typing import TYPE_CHECKING, Protocol
from zoneinfo import ZoneInfo

from gateway.storage import DirectoryReads, Health, ReportReads

if TYPE_CHECKING:
    from gateway.accounts import Accounts
    from gateway.clock import Clock
    from gateway.config import Config
    from gateway.currency import Money
    from gateway.metrics import Metrics
    from gateway.reports import Reports
    from gateway.snapshot import Current, Snapshot

__all__ = ["ServiceStorage", "Services"]


class ServiceStorage(Health, DirectoryReads, ReportReads, Protocol):
    """What the endpoints read from the database themselves: listings, alerts and
    exports (`ReportReads`), a user's keys and a team's members (`DirectoryReads`),
    and whether it answers (/readyz: `ping`). Their changes go through
    `Accounts` (which also tells the caches), their reports through `Reports`:
    nothing here changes the database."""


@dataclasses.dataclass(frozen=True, slots=True)
class Services:
    current: Current
    storage: ServiceStorage
    reports: Reports
    accounts: Accounts
    clock: Clock
    metrics: Metrics
    money: Money  # the one currency the database keeps money in

    @property
    def currency(self) -> str:
        return self.money.code

    @property
    def snapshot(self) -> Snapshot:
        """The configuration snapshot in force (read it once per request)."""
        return self.current.snapshot

    @property
    def config(self) -> Config:
        return self.current.snapshot.config

    @property
    def tz(self) -> ZoneInfo:
        return self.current.snapshot.tz

    def today(self) -> date:
        """The local calendar day now, in the configured time zone."""
        return self.current.snapshot.today(self.clock.now())

    def error_body(self, status: int, code: str, message: str) -> bytes:
        """An error body in the upstream's shape (the dialect in force)."""
        return self.current.snapshot.upstream.error_body(status, code, message)
