"""Guesses of the admin token, counted per client and throttled (pure, no I/O).

The admin API, the dashboard's sign-in and /metrics each take a secret. Without a
limit, a client could try tokens as fast as the gateway answers. `SecretGuard`
counts each client's wrong guesses in a window that starts at its first one; a
client with ``limit`` of them is answered "try again later" (429, Retry-After)
until the window ends, *before* its token is looked at, so even the right token
does not help it meanwhile (docs/admin.md, "Guessing the token").

Bounded: at most ``max_clients`` clients are remembered. Windows are kept oldest
first; the ended ones go first, and when the table is still full the oldest is
forgotten, so addresses without end cost a fixed amount of memory. (Forgetting
gives an address its guesses back early, but an attacker with that many
addresses has that many guesses per window anyway.)

Per process: under ``--workers N`` or N replicas each counts on its own, so a
client gets up to N times ``limit`` guesses per window.
"""

from __future__ import annotations

import hmac
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

MAX_CLIENTS: Final = 10_000


@dataclass(slots=True)
class _Failures:
    since: float  # the first failure of the window
    count: int


@dataclass(frozen=True, slots=True)
class Check:
    """A presented secret judged: accepted, refused, or not looked at (throttled)."""

    accepted: bool
    retry_after: int | None = None  # seconds; set when the client is throttled


class SecretGuard:
    def __init__(self, *, clock: Callable[[], float], max_clients: int = MAX_CLIENTS) -> None:
        self._clock = clock
        self._max = max_clients
        self._clients: OrderedDict[str, _Failures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def check(
        self,
        client: str,
        presented: str | None,
        secrets: Iterable[str],
        *,
        limit: int,
        window: float,
        throttle: bool = True,
    ) -> Check:
        """Whether ``presented`` is one of ``secrets`` (the empty ones never match).

        A throttled client gets ``Check(False, retry_after)`` whatever it presents.
        A wrong secret counts as a failure; no secret at all does not (it guesses
        nothing), and success does not clear the count (a client could otherwise
        interleave the right token, from a shared address, with guesses).
        """
        now = self._clock()
        if throttle:
            wait = self._retry_after(client, now, limit=limit, window=window)
            if wait is not None:
                return Check(False, wait)
        if presented is None:
            return Check(False)
        given = presented.encode()
        good = False
        for secret in secrets:
            # Every secret compared, each in constant time: no early exit tells
            # which one (or how much of one) matched.
            good |= bool(secret) and hmac.compare_digest(given, secret.encode())
        if not good and throttle:
            self._failed(client, now, window=window)
        return Check(good)

    def _retry_after(self, client: str, now: float, *, limit: int, window: float) -> int | None:
        entry = self._clients.get(client)
        if entry is None:
            return None
        if now < entry.since:
            # The wall clock was set back: the window restarts now, so the wait is
            # never longer than one window.
            entry.since = now
        left = entry.since + window - now
        if left <= 0:
            del self._clients[client]
            return None
        if entry.count < limit:
            return None
        return max(1, math.ceil(left))

    def _failed(self, client: str, now: float, *, window: float) -> None:
        entry = self._clients.get(client)
        if entry is not None and now - entry.since < window:
            entry.count += 1
            return
        self._clients.pop(client, None)
        # New windows go last, so the table stays ordered by window start.
        while self._clients:
            oldest = next(iter(self._clients.values()))
            if now - oldest.since < window and len(self._clients) < self._max:
                break
            self._clients.popitem(last=False)
        self._clients[client] = _Failures(since=now, count=1)
