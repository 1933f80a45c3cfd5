"""Model allow-lists (issue 21): which models a plan lets a request use (pure
logic, no I/O).

A plan's ``models`` is a list of globs (``"gpt-4o-mini"``, ``"llama-3*"``,
`fnmatch` syntax). A model is allowed when it matches one of them exactly as
the request names it: case-sensitively and with nothing trimmed, because that
string is what the upstream receives (the gateway forwards the body it parsed,
re-serialised, so no second reading of it reaches the upstream). A spelling the
upstream might read as another model (``"GPT-4O"``, ``" gpt-4o"``) is therefore
refused unless a glob matches that very spelling: refusing a harmless variant is
the safe side of the mistake. A request that must name its model and names
none (or names it with something other than a string) is refused too, since the
upstream would pick one itself (a stored prompt's model, a server's default).

Which models a request names, and where, is the dialect's business
(`Upstream.requested_models`): the check applies to dialects whose requests
name the model (OpenAI-compatible), not to Dify's, whose app fixes its model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from gateway.errors import Forbidden
from gateway.messages import english

__all__ = ["allows", "check_models", "shown_model"]

# A model name is echoed in the refusal: long enough to recognise, never a
# caller's megabyte.
_SHOWN_CHARS = 100


def allows(globs: Sequence[str] | None, model: str) -> bool:
    """Whether ``model`` matches one of ``globs`` (None: every model is allowed)."""
    if globs is None:
        return True
    return any(fnmatch.fnmatchcase(model, glob) for glob in globs)


def shown_model(model: str) -> str:
    # repr: quotes, and escapes for whitespace and control characters, so a
    # refused " gpt-4o" or "gpt-4o\n" shows what was sent.
    text = repr(model[:_SHOWN_CHARS])
    return text if len(model) <= _SHOWN_CHARS else text[:-1] + "…" + text[-1]


def check_models(globs: Sequence[str] | None, requested: Iterable[str | None]) -> None:
    """Refuse (403 ``model_not_in_plan``) unless every model a request names is
    allowed; a None among ``requested`` is a model the request should name and
    does not."""
    if globs is None:
        return
    for model in requested:
        if model is None:
            key = "model_not_in_plan_unnamed"
            raise Forbidden(english(key), code="model_not_in_plan", key=key)
        if not allows(globs, model):
            fields = {"model": shown_model(model)}
            raise Forbidden(
                english("model_not_in_plan", **fields),
                code="model_not_in_plan",
                key="model_not_in_plan",
                fields=fields,
            )
