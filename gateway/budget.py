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
- plus the paid calls the request itself decides, at their call prices.

Dify prices an answer only when it ends: admission reserves the configured
``accounting.answer_reservation`` for each (docs/quotas.md).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson

from gateway.upstreams import Route
from gateway.upstreams.anthropic import AnthropicUpstream
from gateway.upstreams.anthropic_wire import ServerCalls
from gateway.upstreams.openai import OpenAIUpstream
from gateway.usage import Metered, Usage

# The fields that cap an answer's output tokens, in the order they are read:
# Chat Completions (max_completion_tokens, the older max_tokens), Completions
# (max_tokens) and Responses (max_output_tokens).
OUTPUT_CAPS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def output_cap(body: dict[str, Any]) -> int | None:
    """The request's own cap on its output tokens, per answer, or None."""
    for name in OUTPUT_CAPS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def answers(body: dict[str, Any]) -> int:
    """How many answers the request asks for (``n``, default 1)."""
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1


def bound_usage(body: dict[str, Any], *, reserve_output_tokens: int) -> tuple[Usage, bool]:
    """The most tokens a request's answer can use, and whether that is a bound
    (False: the request set no output cap, ``reserve_output_tokens`` stands in)."""
    prompt = len(orjson.dumps(body))
    cap = output_cap(body)
    output = (reserve_output_tokens if cap is None else cap) * answers(body)
    usage = Usage(prompt_tokens=prompt, completion_tokens=output, total_tokens=prompt + output)
    return usage, cap is not None


def cost_bound(
    upstream: object,
    route: Route,
    body: dict[str, Any],
    *,
    reserve_output_tokens: int,
    answer_reservation: Decimal,
) -> Decimal:
    """What admission reserves against money budgets for one answer request."""
    usage, _ = bound_usage(body, reserve_output_tokens=reserve_output_tokens)
    model = body.get("model") if isinstance(body.get("model"), str) else None
    metered = Metered(None, None, None, usage, "timeout", model=model)
    if isinstance(upstream, OpenAIUpstream):
        priced = upstream.priced(metered, model, calls=upstream.calls(route, body, {}))
    elif isinstance(upstream, AnthropicUpstream):
        # Messages requires max_tokens; the server tools the request lists are
        # priced one call each (the web searches an answer runs are known only
        # when it ends: docs/quotas.md, "Money budgets").
        priced = upstream.priced(metered, body, ServerCalls())
    else:
        return answer_reservation
    return priced.usage.cost if priced.usage is not None else answer_reservation
