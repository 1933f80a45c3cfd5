"""Usage values and the arithmetic on them: token counts, decimal prices, estimates.

Pure logic, no I/O. Money is :class:`decimal.Decimal` end to end; Dify sends prices
as decimal strings (``"0.0010330"``, ``"0E-7"``) and sometimes as JSON numbers, and
both must come out exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any, Literal

ZERO = Decimal(0)

# Characters per token for estimates. English prose averages about four characters
# per token with the GPT/Claude tokenizers; it is the usual rule of thumb and what
# docs/usage.md documents as the estimate's method.
CHARS_PER_TOKEN = 4

Outcome = Literal[
    "complete",  # the upstream reported usage
    "error",  # the upstream sent an error event after producing text
    "cut",  # the upstream connection ended without usage
    "disconnected",  # the client left and the answer was stopped or timed out
    "timeout",  # the upstream took the request but did not answer in time
    "shutdown",  # the gateway shut down (its grace ran out) before the answer ended
    "recovered",  # its gateway died before settling it: charged the admission's estimate
]


def parse_decimal(value: object) -> Decimal:
    """Parse a price as Dify sends it: a decimal string, an int, a float or null.

    Floats go through ``repr`` so ``0.1`` becomes ``Decimal("0.1")``, not the binary
    expansion. Anything else raises ``ValueError``.
    """
    if value is None or value == "":
        return ZERO
    if isinstance(value, bool):
        raise ValueError(f"not a price: {value!r}")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"not a price: {value!r}")
        return Decimal(repr(value))
    if isinstance(value, str):
        try:
            result = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"not a price: {value!r}") from None
        if not result.is_finite():
            raise ValueError(f"not a price: {value!r}")
        return result
    raise ValueError(f"not a price: {value!r}")


def parse_tokens(value: object) -> int:
    """Parse a token count: a non-negative integer (an integral float is accepted)."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ValueError(f"not a token count: {value!r}")
    if isinstance(value, int):
        result = value
    elif isinstance(value, float) and value.is_integer():
        result = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        result = int(value)
    else:
        raise ValueError(f"not a token count: {value!r}")
    if result < 0:
        raise ValueError(f"negative token count: {value!r}")
    return result


class FieldReader:
    """Reads the numbers of one usage object each on its own, so that one bad
    field costs only itself (docs/proxy.md, "Clamped answers").

    A count that is not a non-negative integer becomes its bound: a fraction is
    rounded up (the upstream used at least that much), a negative or unreadable
    one is zero. A price that is not a finite decimal is zero. Each such field is
    named in ``clamped``, with what it held, and the answer is recorded with
    outcome ``clamped``; the rest of the usage, and its cost, is kept as reported.
    """

    __slots__ = ("clamped",)

    def __init__(self) -> None:
        self.clamped: list[str] = []

    def _bad(self, name: str, value: object) -> None:
        try:
            shown = repr(value)[:64]
        except Exception:  # a repr can raise (an int past the digit limit)
            shown = f"<{type(value).__name__}>"
        self.clamped.append(f"{name}={shown}")

    def bad(self, name: str, value: object) -> None:
        """Name a field the caller could not read, and bounded itself."""
        self._bad(name, value)

    def tokens(self, raw: dict[str, Any], name: str) -> int:
        """``raw[name]`` as a token count (absent or null: 0)."""
        return self._tokens(raw, name)[0]

    def _tokens(self, raw: dict[str, Any], name: str) -> tuple[int, bool]:
        value = raw.get(name)
        try:
            return parse_tokens(value), True
        except ValueError:
            pass
        self._bad(name, value)
        return _rounded_up(value), False

    def total(self, raw: dict[str, Any], name: str, *parts: int) -> int:
        """``raw[name]`` as a total; absent or bad, the sum of its ``parts``."""
        value = raw.get(name)
        if value is None:
            return sum(parts)
        try:
            return parse_tokens(value)
        except ValueError:
            self._bad(name, value)
            return sum(parts)

    def split(
        self, raw: dict[str, Any], prompt_name: str, completion_name: str, total_name: str
    ) -> tuple[int, int, int]:
        """Prompt, completion and total tokens, each bad one derived from the
        others where they tell it (total = prompt + completion), else bounded."""
        prompt, prompt_ok = self._tokens(raw, prompt_name)
        completion, completion_ok = self._tokens(raw, completion_name)
        bad_before = len(self.clamped)
        total = self.total(raw, total_name, prompt, completion)
        total_ok = raw.get(total_name) is not None and len(self.clamped) == bad_before
        if total_ok and prompt_ok != completion_ok:
            # One part bad, the total good: the bad part is what the total leaves.
            if prompt_ok:
                completion = max(total - prompt, 0)
            else:
                prompt = max(total - completion, 0)
        return prompt, completion, total

    def usable(self, usage: Usage) -> Usage:
        """``usage`` marked with the fields bounded; raises ``ValueError`` when a
        field was bad and nothing is left to charge (no tokens, no cost): then the
        caller's estimate is the better record."""
        if self.clamped and not usage.total_tokens and not usage.cost:
            raise ValueError(f"no usable usage: {', '.join(self.clamped)}")
        return replace(usage, clamped=tuple(self.clamped)) if self.clamped else usage

    def price(self, raw: dict[str, Any], name: str) -> Decimal | None:
        """``raw[name]`` as a price; None when it is bad (the caller chooses what
        stands in for it: a sum of parts, or zero)."""
        value = raw.get(name)
        try:
            return parse_decimal(value)
        except ValueError:
            self._bad(name, value)
            return None


# Beyond any bound the ledger keeps (usage_bounds.py clamps counts far below it).
_COUNT_CEILING = 2**63 - 1


def _rounded_up(value: object) -> int:
    """A bad count's bound: a finite non-negative number rounded up, else 0."""
    if isinstance(value, bool):
        return 0
    try:
        number = parse_decimal(value)
    except ValueError:
        return 0
    if number <= 0:
        return 0
    if number > _COUNT_CEILING:  # "1e999999999" is not made into a billion-digit int
        return _COUNT_CEILING
    return int(number.to_integral_value(rounding=ROUND_CEILING))


def estimate_tokens(chars: int) -> int:
    """Tokens for ``chars`` characters of text, rounded up (see CHARS_PER_TOKEN)."""
    return -(-max(chars, 0) // CHARS_PER_TOKEN)


@dataclass(frozen=True, slots=True)
class Usage:
    """What one answer consumed, as the upstream reported it (or as estimated)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost: Decimal = ZERO
    currency: str = "USD"
    estimated: bool = False
    # Parts of the counts above, where the upstream reports them (OpenAI does):
    # prompt tokens read from the prompt cache, completion tokens spent reasoning.
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    # Prompt tokens written to the prompt cache (Anthropic's cache_creation_input_tokens),
    # like cached_tokens a part of prompt_tokens, billed at their own rate.
    cache_write_tokens: int = 0
    # Of cache_write_tokens, those written to a 1-hour cache (Anthropic's
    # usage.cache_creation.ephemeral_1h_input_tokens), billed at their own rate;
    # the rest are 5-minute writes.
    cache_write_1h_tokens: int = 0
    # The fields the upstream reported out of range, each with what it held
    # ("total_tokens=-5"): the answer is recorded with outcome "clamped".
    clamped: tuple[str, ...] = ()

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
            cost=self.cost + other.cost,
            currency=self.currency if self.total_tokens or self.cost else other.currency,
            estimated=self.estimated or other.estimated,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
            cache_write_1h_tokens=self.cache_write_1h_tokens + other.cache_write_1h_tokens,
            clamped=self.clamped + other.clamped,
        )


@dataclass(frozen=True, slots=True)
class Metered:
    """The result of reading one upstream answer: who it was, what it cost.

    ``usage`` is None when nothing is to be charged (an error before any text).
    ``metadata`` is the answer's metadata object (``message_end.metadata``, or a
    workflow's ``outputs``) for rules that look into it, such as web-search counting.
    ``model`` is the model that answered, when the upstream names it.
    ``web_searches``: the web searches the answer ran, as a dialect that counts
    them reads them from the answer (OpenAI's web-search calls, Anthropic's
    ``server_tool_use.web_search_requests``); None where the ``[web_search]``
    rule reads ``metadata`` instead (Dify).
    ``unpriced_calls``: the paid side calls the answer made that no
    ``[call_prices]`` entry prices (Dify's auto-play speech): the answer is
    recorded without them, and the proxy counts and logs them.
    """

    answer_id: str | None
    task_id: str | None
    conversation_id: str | None
    usage: Usage | None
    outcome: Outcome
    error_code: str | None = None
    metadata: dict[str, object] | None = None
    model: str | None = None
    web_searches: int | None = None
    unpriced_calls: tuple[str, ...] = ()


def estimate_usage(prompt_chars: int, text_chars: int) -> Usage:
    """An estimate for an answer whose upstream reported no usage: tokens from
    the characters of the prompt and of the text that came (see CHARS_PER_TOKEN),
    no cost, marked estimated."""
    prompt = estimate_tokens(prompt_chars)
    completion = estimate_tokens(text_chars)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        estimated=True,
    )


def unreadable_answer(prompt_chars: int, response: bytes) -> Metered:
    """A 2xx answer that cannot be read (not JSON, or cut off past the buffer):
    the upstream produced, and billed, something, so it is charged an estimate
    from the prompt and the bytes that came, never nothing."""
    usage = estimate_usage(prompt_chars, len(response))
    return Metered(None, None, None, usage, "cut", error_code="unreadable_answer")
