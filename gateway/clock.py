"""Time: an injectable clock and the calendar periods quotas are counted in.

Days and months are calendar periods in the configured time zone, so a user in
Asia/Ho_Chi_Minh gets a fresh daily allowance at their midnight, not at UTC's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class FixedClock:
    """A clock that stands still until moved; for tests and tools."""

    def __init__(self, now: datetime) -> None:
        if now.tzinfo is None:
            raise ValueError("FixedClock needs a timezone-aware datetime")
        self._now = now

    def now(self) -> datetime:
        return self._now

    def set(self, now: datetime) -> None:
        if now.tzinfo is None:
            raise ValueError("FixedClock needs a timezone-aware datetime")
        self._now = now

    def advance(self, delta: timedelta) -> None:
        self._now += delta


@dataclass(frozen=True, slots=True)
class Offset:
    """How far another clock (the database's) is from this machine's, read once.

    The other clock was read somewhere between ``sent`` and ``received`` on
    ours; taken against the midpoint, the true offset is within half the round
    trip either side of ``seconds``.
    """

    seconds: float  # the other clock minus ours: positive when ours is behind
    round_trip: float  # seconds between sending the question and reading the answer
    local: datetime  # our clock at the midpoint of the round trip
    remote: datetime  # what the other clock said

    @classmethod
    def between(cls, sent: datetime, remote: datetime, received: datetime) -> Offset:
        """The offset of ``remote``, read between ``sent`` and ``received`` on our clock."""
        round_trip = received - sent
        local = sent + round_trip / 2
        return cls((remote - local).total_seconds(), round_trip.total_seconds(), local, remote)

    def beyond(self, bound: float) -> bool:
        """Whether the offset is past ``bound`` seconds (either way) however the
        round trip split: a slow answer alone never is."""
        return abs(self.seconds) - self.round_trip / 2 > bound


@dataclass(frozen=True, slots=True)
class Periods:
    """The accounting periods that contain one instant."""

    day: date  # the local calendar day
    month_start: date  # the first day of the local calendar month
    day_resets_at: datetime  # the next local midnight, aware
    month_resets_at: datetime  # local midnight of the first of next month, aware


def periods_at(now: datetime, tz: tzinfo) -> Periods:
    return _periods_of(now.astimezone(tz).date(), tz)


@functools.lru_cache(maxsize=64)
def _periods_of(day: date, tz: tzinfo) -> Periods:
    # Depends only on the local day: computed once a day, not on every admission.
    month_start = day.replace(day=1)
    next_month = (month_start + timedelta(days=32)).replace(day=1)
    return Periods(
        day=day,
        month_start=month_start,
        day_resets_at=datetime.combine(day + timedelta(days=1), time(0), tzinfo=tz),
        month_resets_at=datetime.combine(next_month, time(0), tzinfo=tz),
    )
