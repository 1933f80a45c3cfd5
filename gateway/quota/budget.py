"""Money budgets (issue 21): the upper bound of an answer's cost that admission
reserves against ``cost_per_day`` and ``cost_per_month``.

A budget is a hard cap when the bound is one: settle then only ever lowers what
was reserved to the true cost, so answers running at the same time can never
spend past the budget together. The bound comes from the request and the price
table where the dialect prices answers itself (OpenAI, Anthropic):

- prompt tokens: at most one per byte of the request body (no tokenizer makes
  more tokens than the bytes of its text; the body's JSON around the prompt
  covers each message's few tokens of framing);
- output tokens: the request's own cap (``max_completion_tokens``,
  ``max_tokens``, ``max_output_tokens``) times ``n`` answers - or, for a request
  that sets none, ``accounting.reserve_output_tokens``, which is then not a
  bound (docs/quotas.md says by how much a budget can be passed then);
- plus, for a request with tools, the prompt the provider adds for them, which
  the body does not hold (`tool_prompt`);
- plus the paid calls the request itself decides, at their call prices.

Dify prices an answer only when it ends: admission reserves the configured
``accounting.answer_reservation`` for each (docs/quotas.md).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson

from gateway.pricing import Audio, Price
from gateway.upstreams import Route
from gateway.upstreams.anthropic import AnthropicUpstream
from gateway.upstreams.anthropic_wire import ServerCalls
from gateway.upstreams.openai import OpenAIUpstream
from gateway.usage import Metered, Usage

# The fields that cap an answer's output tokens, in the order they are read:
# Chat Completions (max_completion_tokens, the older max_tokens), Completions
# (max_tokens) and Responses (max_output_tokens).
OUTPUT_CAPS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
# The caps each kind of answer route honours: a field its endpoint does not read
# bounds nothing (an OpenAI-compatible server ignores it and answers on).
ROUTE_CAPS = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "completion": ("max_tokens",),
    "response": ("max_output_tokens",),
    "message": ("max_tokens",),
}
# Far above any model's output; a larger count is priced as this many tokens.
_MOST = 2**63
# The prompt a provider adds to a request that lists tools, billed as input
# though the body does not hold it (review-limits F2). Anthropic documents its
# tool-use system prompt by model and `tool_choice`: 159 to 530 tokens for the
# Claude 3 models, 346 for later ones (others report more for the newest);
# twice the largest documented, as later models have grown it.
TOOL_USE_PROMPT = 1_024
# A tool of the provider's own schema (Anthropic's bash, text editor, computer
# use, its server tools; a Responses API tool such as `computer_use_preview`)
# is defined by the provider, not by the body: Anthropic documents 245 input
# tokens for bash, 700 for the text editor, 735 for the computer tool beside
# computer use's own system prompt. Each such tool is held as this many.
SCHEMA_TOOL_PROMPT = 1_536
# The tools a body defines itself (their definitions are in its bytes).
_OWN_TOOL_TYPES = frozenset({"custom", "function"})


def _count(value: object) -> int | None:
    """``value`` as a lenient upstream reads a count (pydantic's lax mode, as
    vLLM's): an int, an integral float, or a string of one; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float | str):
        try:
            number = Decimal(value.strip() if isinstance(value, str) else value)
        except ArithmeticError:
            return None
        if not number.is_finite() or number != number.to_integral_value():
            return None
        return _MOST if number > _MOST else int(number)
    return None


def output_cap(body: dict[str, Any], kind: str | None = None) -> int | None:
    """The request's own cap on its output tokens, per answer, or None (no bound),
    read as the most lenient compatible server reads the caps the route's ``kind``
    honours: vLLM and SGLang take ``max_completion_tokens or max_tokens``, so a
    cap of 0 (``0``, ``"0"``, ``0.0``), like null, is "not set" and the next field
    is read (review-sec F1: ``max_completion_tokens: 0`` beside ``max_tokens:
    1000`` was taken for a bound of no output at all); a server that knows only
    ``max_tokens`` reads that one, so of two caps set the larger is the bound. A
    negative cap (llama.cpp reads ``-1`` as "no limit") or one no count reads is
    no bound; so is a request whose fields are all unset or 0."""
    bound: int | None = None
    for name in ROUTE_CAPS.get(kind or "", OUTPUT_CAPS):
        value = body.get(name)
        if value is None:
            continue
        cap = _count(value)
        if cap is None or cap < 0:
            return None
        if cap > 0 and (bound is None or cap > bound):
            bound = cap
    return bound


def answers(body: dict[str, Any], kind: str | None = None) -> int:
    """How many answers the request is billed for (``n``, default 1; a
    completion's ``best_of`` candidates, when more)."""
    n = _count(body.get("n"))
    count = n if n is not None and n >= 1 else 1
    if kind == "completion":
        best_of = _count(body.get("best_of"))
        if best_of is not None and best_of > count:
            count = best_of
    return count


def bound_usage(
    body: dict[str, Any], *, reserve_output_tokens: int, kind: str | None = None
) -> tuple[Usage, bool]:
    """The most tokens a request's answer can use, and whether that is a bound
    (False: the request set no output cap, ``reserve_output_tokens`` stands in)."""
    prompt = len(orjson.dumps(body)) + tool_prompt(body)
    cap = output_cap(body, kind)
    each = reserve_output_tokens if cap is None else cap
    prediction = body.get("prediction") if kind == "chat" else None
    if prediction is not None:
        # Predicted Outputs: the predicted tokens an answer does not use are
        # billed at the completion rate too (review-limits F7); at most one a
        # byte of the prediction.
        each += len(orjson.dumps(prediction))
    output = each * answers(body, kind)
    usage = Usage(prompt_tokens=prompt, completion_tokens=output, total_tokens=prompt + output)
    return usage, cap is not None


def tool_prompt(body: dict[str, Any]) -> int:
    """The prompt tokens a provider adds for the tools a request lists, at most
    (`TOOL_USE_PROMPT`, and `SCHEMA_TOOL_PROMPT` for each tool of its own
    schema); 0 for a request without tools."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return 0
    added = TOOL_USE_PROMPT
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind not in _OWN_TOOL_TYPES:
            added += SCHEMA_TOOL_PROMPT
    return added


def cost_bound(
    upstream: object,
    route: Route,
    body: dict[str, Any],
    *,
    reserve_output_tokens: int,
    answer_reservation: Decimal,
) -> Decimal:
    """What admission reserves against money budgets for one answer request."""
    if not isinstance(upstream, OpenAIUpstream | AnthropicUpstream):
        return answer_reservation  # (Dify) priced only when it ends
    usage, _ = bound_usage(body, reserve_output_tokens=reserve_output_tokens, kind=route.kind)
    model = body.get("model") if isinstance(body.get("model"), str) else None
    # Each token at the dearest rate it can be billed at: a prompt token as text,
    # audio or a cache write, an output token as text or audio (the dearest of
    # each, whichever the price table sets higher).
    written = Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        cache_write_tokens=usage.prompt_tokens,
    )
    # A request that asks for a 1-hour cache may have its whole prompt written to
    # one, at the 1-hour rate (Anthropic writes one only when asked: the same
    # reading of cache_control that refuses the ttl where it has no price).
    written_1h = Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        cache_write_tokens=usage.prompt_tokens,
        cache_write_1h_tokens=usage.prompt_tokens,
    )
    costs: list[Decimal | None] = []
    if isinstance(upstream, OpenAIUpstream):
        calls = upstream.calls(route, body, {})
        one_hour = upstream.asks_for_one_hour_cache(body)
        if _one_rate(upstream.price(model)) and not one_hour:
            # No audio or cache-write rate of its own: every one of the variants
            # below costs what the plain one does (the same terms, the same
            # decimal), so it alone is priced.
            variants: tuple[Usage, ...] = (usage,)
            audios: tuple[tuple[int, int], ...] = ((0, 0),)
        else:
            # (A router in front of Claude writes its cache: review4 R4-2.)
            variants = (usage, written, written_1h) if one_hour else (usage, written)
            audios = ((0, 0), (usage.prompt_tokens, 0), (0, usage.completion_tokens),
                      (usage.prompt_tokens, usage.completion_tokens))  # fmt: skip
        for tokens in variants:
            metered = Metered(None, None, None, tokens, "timeout", model=model)
            for heard, spoken in audios:
                audio = Audio(prompt=heard, completion=spoken)
                costs.append(_cost(upstream.priced(metered, model, calls=calls, audio=audio)))
    else:
        # Messages requires max_tokens; the server tools the request lists are
        # priced one call each (the web searches an answer runs are known only
        # when it ends: docs/quotas.md, "Money budgets").
        bounds: list[Usage] = [usage, written]
        if upstream.asks_for_one_hour_cache(body):
            bounds.append(written_1h)
        for tokens in bounds:
            metered = Metered(None, None, None, tokens, "timeout", model=model)
            costs.append(_cost(upstream.priced(metered, body, ServerCalls())))
    found = [cost for cost in costs if cost is not None]
    return max(found) if found else answer_reservation


def _one_rate(price: Price | None) -> bool:
    """Whether ``price`` bills every prompt token at one rate and every output
    token at one (no audio or cache-write rate set), or there is none."""
    return price is None or (
        price.cache_write_input is None and price.audio_input is None and price.audio_output is None
    )


def _cost(metered: Metered) -> Decimal | None:
    return metered.usage.cost if metered.usage is not None else None


def lowered_cap(
    upstream: object,
    route: Route,
    body: dict[str, Any],
    remaining: Decimal,
    *,
    reserve_output_tokens: int,
) -> int | None:
    """The largest output-token cap (per answer, at least 1) whose answer's cost
    bound is at most ``remaining`` - with that cap written into the body, as it
    would be forwarded - below the request's own cap (or, for a request that
    sets none, ``reserve_output_tokens``); None when even one token's answer
    does not fit, or when the route has no cap a dialect of ours honours."""
    fields = ROUTE_CAPS.get(route.kind or "")
    if not fields or not isinstance(upstream, OpenAIUpstream | AnthropicUpstream):
        return None
    current = output_cap(body, route.kind)
    top = (reserve_output_tokens if current is None else current) - 1
    if top < 1:
        return None

    def fits(cap: int) -> bool:
        bound = cost_bound(
            upstream,
            route,
            with_cap(body, route, cap),
            reserve_output_tokens=reserve_output_tokens,
            answer_reservation=Decimal(0),
        )
        return bound <= remaining

    if not fits(1):
        return None
    low, high = 1, top  # fits(low); the answer is in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def with_cap(body: dict[str, Any], route: Route, cap: int) -> dict[str, Any]:
    """``body`` with its output-token cap ``cap``: every cap field the route
    honours that the body sets is set to it (or, when it sets none, the
    route's first: ``max_completion_tokens`` for Chat Completions); nothing
    else changes."""
    fields = ROUTE_CAPS[route.kind or ""]
    present = [name for name in fields if body.get(name) is not None]
    return {**body, **{name: cap for name in present or fields[:1]}}
