"""The other models an OpenAI-compatible router answers a request with: fields
besides ``model`` that name them (pure logic, no I/O; review-sec F12).

The usual "OpenAI-compatible upstream" in front of many providers is a router,
and routers read more than ``model``. LiteLLM's proxy takes client-side
fallbacks, model groups tried in order when the first fails
(docs.litellm.ai/docs/proxy/client_side_fallbacks, /docs/proxy/reliability):
``fallbacks`` (``["gpt-4o"]``, or ``[{"gpt-4o-mini": ["gpt-4o"]}]``),
``context_window_fallbacks`` and ``content_policy_fallbacks`` (the second
form), and its SDK's ``context_window_fallback_dict`` (``{"gpt-4o-mini":
"gpt-4o"}``); ``mock_testing_fallbacks`` (``_context_``, ``_content_policy_``)
makes it fall back at once, to the request's fallbacks or the router's own;
``model_list`` and ``user_config`` give a request deployments of its own (any
name, any model behind it). OpenRouter tries ``models`` in order when the first
fails, and picks a model itself for ``route: "fallback"``
(openrouter.ai/docs/model-routing).

A failure is easy to provoke (a context the first model cannot take), so every
model named there can answer, and the answer is charged as the model it reports.
Each is checked as ``model`` is - the plan's allow-list (``requested_models``)
and the price table - and may cost no more than ``model``: the money budget's
bound is the price of ``model``, and so is the price of an answer that reports
a name the table does not know (a router's deployment name). A field that
names no model the gateway can check (a forced fallback, the router's own
choice, per-request deployments, a value of another shape) is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any, Final, Never

from gateway.errors import Forbidden
from gateway.messages import english
from gateway.model_access import shown_model
from gateway.pricing import Price, PriceTable

__all__ = ["FIELDS", "check_fallbacks", "fallback_models"]

# Lists of model names, or of {model group: [model names]}.
_LISTS: Final = ("fallbacks", "models", "context_window_fallbacks", "content_policy_fallbacks")
# {model: model name}.
_MAPS: Final = ("context_window_fallback_dict",)
# Refused whatever they say (unless null or false): they name no model to check.
_UNCHECKABLE: Final = (
    "mock_testing_fallbacks",
    "mock_testing_context_fallbacks",
    "mock_testing_content_policy_fallbacks",
    "model_list",
    "user_config",
    "route",
)
FIELDS: Final = frozenset((*_LISTS, *_MAPS, *_UNCHECKABLE))
_CODE: Final = "model_fallback_not_allowed"
_ZERO: Final = Decimal(0)


def fallback_models(body: dict[str, Any]) -> tuple[str, ...]:
    """The models the body's router fields name, in order (none for most
    requests); refuses (403 ``model_fallback_not_allowed``) a field that names
    none the gateway can check."""
    if body.keys().isdisjoint(FIELDS):
        return ()
    for field in _UNCHECKABLE:
        if body.get(field) not in (None, False):
            _refuse_field(field)
    names: list[str] = []
    for field in _LISTS:
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, list):
            _refuse_field(field)
        for entry in value:
            if isinstance(entry, dict):
                # {model group: [fallbacks]}: the groups are what falls back, the
                # lists what answers.
                for group in entry.values():
                    if not isinstance(group, list):
                        _refuse_field(field)
                    names.extend(_name(field, model) for model in group)
            else:
                names.append(_name(field, entry))
    for field in _MAPS:
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, dict):
            _refuse_field(field)
        names.extend(_name(field, model) for model in value.values())
    return tuple(names)


def check_fallbacks(
    body: dict[str, Any],
    model: str | None,
    prices: PriceTable,
    *,
    allow_unpriced: bool,
    calls: Callable[[str | None], Sequence[str]] | None = None,
) -> None:
    """Refuse a fallback the price table does not price (unless unpriced models
    are allowed), one that costs more than ``model`` at any rate, or one that
    makes a paid call ``model`` does not (``calls``: the per-answer calls a
    request makes with a given model, e.g. a search model's web search)."""
    fallbacks = fallback_models(body)
    if not fallbacks:
        return
    ceiling = _rates(prices.find(model))
    made = frozenset(calls(model)) if calls is not None else frozenset()
    for fallback in fallbacks:
        price = prices.find(fallback)
        if price is None and not allow_unpriced:
            fields = {"model": shown_model(fallback)}
            raise Forbidden(
                english("model_not_priced", **fields),
                code="model_not_priced",
                key="model_not_priced",
                fields=fields,
            )
        dearer = any(rate > top for rate, top in zip(_rates(price), ceiling, strict=True))
        if dearer or (calls is not None and not made.issuperset(calls(fallback))):
            key = "model_fallback_dearer"
            fields = {"model": shown_model(fallback), "requested": shown_model(model or "")}
            raise Forbidden(english(key, **fields), code=_CODE, key=key, fields=fields)


def _rates(price: Price | None) -> tuple[Decimal, ...]:
    """Every rate a token can be billed at under ``price`` (none: nothing)."""
    if price is None:
        return (_ZERO,) * 7
    text_in, text_out = price.input, price.output
    return (
        text_in,
        text_out,
        text_in if price.cached_input is None else price.cached_input,
        text_in if price.cache_write_input is None else price.cache_write_input,
        # A router in front of Claude reports 1-hour cache writes (review4 R4-2).
        price.cache_write_1h_rate(),
        text_in if price.audio_input is None else price.audio_input,
        text_out if price.audio_output is None else price.audio_output,
    )


def _name(field: str, value: object) -> str:
    if isinstance(value, str) and value:
        return value
    _refuse_field(field)


def _refuse_field(field: str) -> Never:
    key = "model_fallback_not_allowed"
    fields = {"field": field}
    raise Forbidden(english(key, **fields), code=_CODE, key=key, fields=fields)
