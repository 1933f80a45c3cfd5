"""A prompt cache's lifetime as Anthropic reads it (``cache_control.ttl``), read
one way for both dialects that can reach Claude: Anthropic's own, and OpenAI's
(an LLM router - LiteLLM, Portkey, OpenRouter - in front of Claude passes the
``cache_control`` of OpenAI-format messages and tools on to Anthropic, ttl
included; review4 R4-2).

Anthropic bills the writes of a 5-minute cache (the default) at 1.25x input,
[prices]' ``cache_write_input``, and a 1-hour cache's (``"ttl": "1h"``) at 2x,
``cache_write_1h_input`` (review2 R2-2): "1h" is taken only for a model whose
price sets it. Any other ttl is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from gateway.errors import Forbidden
from gateway.pricing import PriceTable
from gateway.upstreams.base import refuse_option

__all__ = [
    "INJECTION_POINTS",
    "ONE_HOUR",
    "asks_for_one_hour_cache",
    "cache_ttls",
    "check_cache_ttls",
    "price_key",
]

ONE_HOUR: Final = "1h"
# LiteLLM's request field that has it put a cache breakpoint on the messages it
# names (AnthropicCacheControlHook, litellm/integrations/
# anthropic_cache_control_hook.py): a list of ``{"location": "message", "role":
# ..., "index": ..., "control": {"type": "ephemeral", "ttl": ...}}``, each
# ``control`` set as those messages' ``cache_control`` before the call to
# Claude, ttl included (review5 R5-7). Every point's ttl is read, whatever its
# location (a Bedrock ``tool_config`` point carries a ``control`` too).
INJECTION_POINTS: Final = "cache_control_injection_points"
_PRICED: Final = frozenset({"5m"})
# (A tuple: isinstance takes it faster than the union dict | list.)
_CONTAINERS: Final = (dict, list)
_PRICED_1H: Final = _PRICED | {ONE_HOUR}


def cache_ttls(
    body: dict[str, Any],
    parts: Iterable[str],
    skip: frozenset[str],
    injected: Iterable[str] = (),
) -> list[object]:
    """Every ``cache_control.ttl`` set (not None) in the body's top-level
    ``cache_control`` or at any depth of its ``parts``, leaving out the values
    under the keys ``skip`` names (what the client or the model chose that is
    not a content block: a tool's JSON Schema, a tool call's arguments), and
    every ``control.ttl`` of the injection points listed under the keys
    ``injected`` names (a router puts that ``control`` on the messages it
    names as their ``cache_control``: `INJECTION_POINTS`).

    Every answer's body is walked so, a long chat's hundreds of objects: with a
    stack, not recursion (the body may nest a thousand levels), and plain loops,
    not generators (half the time: 18 us for a 40-message chat, 38 before)."""
    ttls: list[object] = []
    stack: list[object] = [{"cache_control": body.get("cache_control")}]
    stack.extend(body.get(part) for part in parts)
    for name in injected:
        points = body.get(name)
        if isinstance(points, list):
            stack.extend(
                {"cache_control": point.get("control")}
                for point in points
                if isinstance(point, dict)
            )
    pop, push = stack.pop, stack.append
    while stack:
        node = pop()
        if isinstance(node, dict):
            control = node.get("cache_control")
            if isinstance(control, dict):
                ttl = control.get("ttl")
                if ttl is not None:
                    ttls.append(ttl)
            for key, child in node.items():
                if isinstance(child, _CONTAINERS) and key not in skip:
                    push(child)
        elif isinstance(node, list):
            for child in node:
                if isinstance(child, _CONTAINERS):
                    push(child)
    return ttls


def asks_for_one_hour_cache(
    body: dict[str, Any],
    parts: Iterable[str],
    skip: frozenset[str],
    injected: Iterable[str] = (),
) -> bool:
    """Whether a request asks for a 1-hour prompt cache (a ``"1h"`` ttl anywhere
    Anthropic reads one): only then may its answer write one."""
    return any(ttl == ONE_HOUR for ttl in cache_ttls(body, parts, skip, injected))


def price_key(prices: PriceTable, model: str | None) -> str:
    """The ``[prices]`` entry that prices ``model`` (the one it would have, when
    none does), as the configuration names it."""
    if model is None:
        return "prices"
    name = prices.name(model)
    if name is None and prices.prices(model):
        name = "*"  # priced by the "*" entry
    return f'prices."{name or model}"'


def check_cache_ttls(
    body: dict[str, Any],
    prices: PriceTable,
    model: str | None,
    *,
    parts: Iterable[str],
    skip: frozenset[str],
    injected: Iterable[str] = (),
) -> None:
    """Refuse (403 ``option_not_priced``) the first ``cache_control.ttl`` the
    price of ``model`` does not open: "1h" without ``cache_write_1h_input``
    (named with the price that would open it), and any ttl but "5m" and "1h"."""
    price = prices.find(model)
    one_hour = price is not None and price.cache_write_1h_input is not None
    priced = _PRICED_1H if one_hour else _PRICED
    for ttl in cache_ttls(body, parts, skip, injected):
        if isinstance(ttl, str) and ttl in priced:
            continue
        option = f"cache_control.ttl: {ttl!r}"
        if ttl == ONE_HOUR:
            raise Forbidden(
                f"The option {option} has no price on this gateway "
                f"({price_key(prices, model)}.cache_write_1h_input), so it is not available.",
                code="option_not_priced",
            )
        refuse_option(option)
