"""Probes: counters a test or a tool can wait on instead of sleeping.

The gateway reports what it finished to the `Probes` it was given: by default
ones that keep nothing (the request path pays one empty call). Tests pass
`Watermarks` (`create_app(probes=...)`), whose counters can be awaited until
they reach a value: requests finished, reloads tried, recovery passes done,
alert deliveries tried, resumed runs followed.
"""

from __future__ import annotations

import asyncio

__all__ = ["Probes", "Watermark", "Watermarks"]


class Probes:
    """What the gateway reports; each report does nothing here."""

    __slots__ = ()

    def request_finished(self) -> None:
        """A proxied request is completely finished (settled or refunded)."""

    def reload_tried(self) -> None:
        """A configuration reload was applied or refused."""

    def recovery_done(self) -> None:
        """A periodic recovery pass is over."""

    def alert_attempted(self) -> None:
        """An alert delivery was tried."""

    def run_followed(self) -> None:
        """The gateway's read of a resumed run is over and settled (gateway/follow.py)."""


class Watermark:
    """A counter that can be awaited until it reaches a value."""

    def __init__(self) -> None:
        self.value = 0
        self._waiters: set[asyncio.Event] = set()

    def bump(self) -> None:
        self.value += 1
        for waiter in self._waiters:
            waiter.set()

    async def wait_for(self, value: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while self.value < value:
                waiter = asyncio.Event()
                self._waiters.add(waiter)
                try:
                    await waiter.wait()
                finally:
                    self._waiters.discard(waiter)


class Watermarks(Probes):
    """Probes that count, for tests and tools to wait on."""

    __slots__ = ("finished", "followed", "outbox_attempts", "recoveries", "reloads")

    def __init__(self) -> None:
        self.finished = Watermark()
        self.reloads = Watermark()
        self.recoveries = Watermark()
        self.outbox_attempts = Watermark()
        self.followed = Watermark()  # resumed runs read and settled

    def request_finished(self) -> None:
        self.finished.bump()

    def reload_tried(self) -> None:
        self.reloads.bump()

    def recovery_done(self) -> None:
        self.recoveries.bump()

    def alert_attempted(self) -> None:
        self.outbox_attempts.bump()

    def run_followed(self) -> None:
        self.followed.bump()

    async def wait_finished(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` proxied requests have completely finished."""
        await self.finished.wait_for(count, timeout)
