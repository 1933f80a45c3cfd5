"""Bounds on the numbers an upstream reports, applied before anything is recorded.

The upstream is trusted to report usage, not to report sane numbers: a token count
of ``1e300`` or a price of ``1e400`` would overflow the database's integer
columns (or the spool's JSON), and a negative price would pay the user back. So
every number of a usage record is brought into range at the ledger's door, and a
record that had to be changed says so: its outcome becomes ``clamped``, which the
admin sees in the ledger and its exports (docs/proxy.md, "Clamped answers").
"""

from __future__ import annotations

import dataclasses
import math
from decimal import Decimal, localcontext

from gateway.storage.base import MAX_ID_CHARS, UsageEvent, stored_id

INT64_MAX = 2**63 - 1

# The default cap on the tokens of one answer: well above any model's context
# window today, far below what would overflow a day's or a lifetime's sum.
DEFAULT_MAX_TOKENS_PER_ANSWER = 10_000_000

# One answer never costs more than this (in its currency), and prices keep at most
# twelve decimal places: the sums stay exact within 28 significant digits, the
# precision of the decimal arithmetic both backends use.
MAX_COST = Decimal(10**9)
COST_QUANTUM = Decimal("1e-12")
_QUANTUM_EXPONENT = -12

CLAMPED = "clamped"  # the outcome of a record whose numbers were brought into range


def bound_tokens(value: object, cap: int) -> tuple[int, bool]:
    """A token count within ``0..cap``, and whether it had to be changed."""
    if isinstance(value, bool) or not isinstance(value, int):
        return 0, True
    if value < 0:
        return 0, True
    if value > cap:
        return cap, True
    return value, False


def bound_cost(value: object) -> tuple[Decimal, bool]:
    """A price within ``0..MAX_COST`` with at most twelve places, and whether it had
    to be changed (a non-finite or non-decimal value counts as nothing)."""
    if not isinstance(value, Decimal) or not value.is_finite():
        return Decimal(0), True
    if value < 0:
        return Decimal(0), True
    if value > MAX_COST:
        return MAX_COST, True
    exponent = value.as_tuple().exponent  # an int: the value is finite
    if isinstance(exponent, int) and exponent < _QUANTUM_EXPONENT:
        with localcontext() as ctx:
            ctx.prec = 60  # enough for MAX_COST at COST_QUANTUM: quantize cannot fail
            value = value.quantize(COST_QUANTUM)
    # Dropping digits beyond the twelfth place is rounding, not clamping.
    return value, False


def _bound_float(value: object) -> tuple[float | None, bool]:
    if value is None:
        return None, False
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, True
    number = float(value) if abs(value) < 1e300 else math.inf
    if not math.isfinite(number) or number < 0:
        return None, True
    return number, False


# Text the upstream (or, for the model asked for, the client) chose; the database
# refuses lone surrogates and NUL characters.
_TEXT_FIELDS = ("answer_id", "conversation_id", "currency", "endpoint", "model", "request_id")

# The longest model name kept: model names are short (the longest of OpenAI's are
# under 50 characters); a longer one is cut, and the record marked.
MAX_MODEL_CHARS = 200
# The upstream's ids are indexed: a longer one becomes a prefix and a digest of
# the whole (`stored_id`), not a cut, so that two ids stay two, and the record
# is marked (review-rec REC-2).
_IDS = ("answer_id", "conversation_id")
_TEXT_CAPS = {"model": MAX_MODEL_CHARS, "answer_id": MAX_ID_CHARS, "conversation_id": MAX_ID_CHARS}

# Counts that are parts of another: (part, whole). A part is never more than its
# whole, so it is bounded by the whole once that is in range.
_PARTS = (
    ("cached_tokens", "prompt_tokens"),
    ("cache_write_tokens", "prompt_tokens"),
    ("reasoning_tokens", "completion_tokens"),
)


def clean_text(value: str) -> str:
    """``value`` as text every database stores: no lone surrogates, no NUL."""
    return value.encode("utf-8", "replace").decode().replace("\x00", "\ufffd")


def _in_range(event: UsageEvent, max_tokens: int) -> bool:
    """Whether bounding would keep every field of ``event`` as it is (the usual
    answer): the checks of the bounds below, in one pass, without the rebuilding.
    False sends the event through them, which then decide; never a wrong True."""
    prompt, completion = event.prompt_tokens, event.completion_tokens
    total, cost = event.total_tokens, event.cost
    cached, written, reasoning = (
        event.cached_tokens,
        event.cache_write_tokens,
        event.reasoning_tokens,
    )
    if not (
        # type() is int: a bool (an int subclass) is bounded as a bad count.
        type(prompt) is int
        and type(completion) is int
        and type(total) is int
        and type(cached) is int
        and type(written) is int
        and type(reasoning) is int
        and 0 <= prompt <= max_tokens
        and 0 <= completion <= max_tokens
        and 0 <= total <= max_tokens
        and 0 <= cached <= prompt
        and 0 <= written <= prompt
        and 0 <= reasoning <= completion
        and type(cost) is Decimal
        and cost.is_finite()
        and 0 <= cost <= MAX_COST
    ):
        return False
    exponent = cost.as_tuple().exponent
    if not isinstance(exponent, int) or exponent < _QUANTUM_EXPONENT:
        return False  # rounded to twelve places below
    for ms in (event.upstream_latency_ms, event.overhead_ms):
        # float() keeps a float as the very object; an int would be converted.
        if ms is not None and not (type(ms) is float and 0 <= ms < 1e300):
            return False
    for name in _TEXT_FIELDS:
        text = getattr(event, name)
        if isinstance(text, str) and not (
            text.isascii() and "\x00" not in text and len(text) <= _TEXT_CAPS.get(name, len(text))
        ):
            return False
    return True


def bound_event(event: UsageEvent, *, max_tokens: int) -> tuple[UsageEvent, list[str]]:
    """The event with every number in range, and the names of the fields changed.

    When any field changed, the outcome becomes ``clamped``: the record is kept
    (the user is charged the cap), and marked for an admin to look at.
    """
    changed: list[str] = []
    if _in_range(event, max_tokens):
        return event, changed
    values: dict[str, object] = {}
    counts: dict[str, int] = {}
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        counts[name], clamped = bound_tokens(getattr(event, name), max_tokens)
        if clamped:
            changed.append(name)
    for name, whole in _PARTS:
        counts[name], clamped = bound_tokens(getattr(event, name), counts[whole])
        if clamped:
            changed.append(name)
    values.update(counts)
    cost, clamped = bound_cost(event.cost)
    values["cost"] = cost
    if clamped:
        changed.append("cost")
    for name in ("upstream_latency_ms", "overhead_ms"):
        ms, clamped = _bound_float(getattr(event, name))
        values[name] = ms
        if clamped:
            changed.append(name)
    for name in _TEXT_FIELDS:
        text = getattr(event, name)
        if not isinstance(text, str):
            continue
        cap = _TEXT_CAPS.get(name)
        if text.isascii() and "\x00" not in text and (cap is None or len(text) <= cap):
            continue  # the usual case: nothing to clean (ASCII holds no surrogates)
        cleaned = clean_text(text)
        cleaned = stored_id(cleaned) if name in _IDS else cleaned[:cap]
        if cleaned != text:
            values[name] = cleaned
            changed.append(name)
    if changed:
        values["outcome"] = CLAMPED
    # Only what bounding replaced (each bound returns the very value it was given
    # when it keeps it): an event in range, the usual one, is returned as it is.
    values = {name: value for name, value in values.items() if value is not getattr(event, name)}
    if not values:
        return event, changed
    return dataclasses.replace(event, **values), changed  # type: ignore[arg-type]
