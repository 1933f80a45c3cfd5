"""The admin-token guard (gateway/throttle.py): wrong guesses counted per client,
on an injected clock."""

from __future__ import annotations

import pytest

from gateway.throttle import Check, SecretGuard

TOKEN = "the-admin-token-0123456789"
LIMIT, WINDOW = 3, 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def attempt(guard: SecretGuard, client: str, token: str | None, **kw: object) -> Check:
    return guard.check(client, token, (TOKEN,), limit=LIMIT, window=WINDOW, **kw)  # type: ignore[arg-type]


def test_the_guess_after_the_limit_is_throttled_even_with_the_right_token(clock: Clock) -> None:
    guard = SecretGuard(clock=clock)
    for _ in range(LIMIT):
        assert attempt(guard, "203.0.113.9", "guess") == Check(False)
    clock.now += 10
    assert attempt(guard, "203.0.113.9", TOKEN) == Check(False, retry_after=50)
    assert attempt(guard, "203.0.113.9", "guess") == Check(False, retry_after=50)
    clock.now += 49.5
    assert attempt(guard, "203.0.113.9", TOKEN) == Check(False, retry_after=1)
    # Another client is not affected, meanwhile.
    assert attempt(guard, "198.51.100.7", TOKEN) == Check(True)
    clock.now += 0.5  # the window has passed
    assert attempt(guard, "203.0.113.9", TOKEN) == Check(True)


def test_a_window_starts_at_the_first_failure(clock: Clock) -> None:
    guard = SecretGuard(clock=clock)
    attempt(guard, "a", "x")
    clock.now += WINDOW - 1
    attempt(guard, "a", "x")
    clock.now += 1  # the first failure's window ended: a new one starts
    attempt(guard, "a", "x")
    attempt(guard, "a", "x")
    assert attempt(guard, "a", TOKEN) == Check(True)  # two in this window
    attempt(guard, "a", "x")
    assert attempt(guard, "a", TOKEN).retry_after == WINDOW


def test_no_token_is_no_guess_and_success_clears_nothing(clock: Clock) -> None:
    guard = SecretGuard(clock=clock)
    for _ in range(LIMIT * 5):
        assert attempt(guard, "a", None) == Check(False)
    assert len(guard) == 0
    attempt(guard, "a", "x")
    attempt(guard, "a", "x")
    # The right token from a shared address does not give the guesser new tries.
    assert attempt(guard, "a", TOKEN) == Check(True)
    attempt(guard, "a", "x")
    assert attempt(guard, "a", TOKEN).retry_after is not None


def test_a_signed_in_request_is_not_throttled_but_still_checked(clock: Clock) -> None:
    guard = SecretGuard(clock=clock)
    for _ in range(LIMIT):
        attempt(guard, "a", "x")
    assert attempt(guard, "a", TOKEN, throttle=False) == Check(True)
    assert attempt(guard, "a", "x", throttle=False) == Check(False)
    assert attempt(guard, "a", TOKEN).retry_after is not None


def test_any_of_several_secrets_and_never_an_empty_one(clock: Clock) -> None:
    guard = SecretGuard(clock=clock)
    assert guard.check("a", "m", ("", "m"), limit=LIMIT, window=WINDOW) == Check(True)
    assert guard.check("a", TOKEN, ("m", TOKEN), limit=LIMIT, window=WINDOW) == Check(True)
    assert guard.check("a", "", ("", ""), limit=LIMIT, window=WINDOW) == Check(False)
    assert guard.check("a", "mm", ("m",), limit=LIMIT, window=WINDOW) == Check(False)


def test_memory_is_bounded_however_many_addresses_guess(clock: Clock) -> None:
    guard = SecretGuard(clock=clock, max_clients=100)
    for i in range(10_000):
        attempt(guard, f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", "x")
        assert len(guard) <= 100
    # The newest addresses are the ones remembered.
    for _ in range(LIMIT - 1):
        attempt(guard, "10.0.39.15", "x")  # address 9999
    assert attempt(guard, "10.0.39.15", TOKEN).retry_after is not None


def test_ended_windows_are_dropped(clock: Clock) -> None:
    guard = SecretGuard(clock=clock)
    for i in range(50):
        attempt(guard, f"old-{i}", "x")
    clock.now += WINDOW
    attempt(guard, "new", "x")
    assert len(guard) == 1


def test_a_wall_clock_set_back_waits_at_most_one_window(clock: Clock) -> None:
    guard = SecretGuard(clock=clock)
    for _ in range(LIMIT):
        attempt(guard, "a", "x")
    clock.now -= 3600
    assert attempt(guard, "a", TOKEN).retry_after == WINDOW
    clock.now += WINDOW
    assert attempt(guard, "a", TOKEN) == Check(True)
