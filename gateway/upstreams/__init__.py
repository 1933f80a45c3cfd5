"""Upstream dialects: everything specific to one chat API sits behind `Upstream`.

`DIALECTS` is the registry: each ``upstream.kind`` setting and the class that
implements it, imported only when chosen. The configuration accepts exactly its
keys.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Final

from gateway.upstreams.base import Prepared, Route, StreamMeter, StreamTransform, Upstream

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = [
    "DIALECTS",
    "Prepared",
    "Route",
    "StreamMeter",
    "StreamTransform",
    "Upstream",
    "get_upstream",
]

# kind -> "module:Class"
DIALECTS: Final[dict[str, str]] = {
    "anthropic": "gateway.upstreams.anthropic:AnthropicUpstream",
    "dify": "gateway.upstreams.dify:DifyUpstream",
    "openai": "gateway.upstreams.openai:OpenAIUpstream",
}


def get_upstream(kind: str, config: Config | None = None) -> Upstream:
    """The dialect for an `upstream.kind` setting, built from the configuration in
    force (a dialect may read settings of its own from it, such as prices)."""
    target = DIALECTS.get(kind)
    if target is None:
        raise ValueError(f"unknown upstream kind {kind!r}")
    module, _, name = target.partition(":")
    dialect: Upstream = getattr(importlib.import_module(module), name)(config)
    return dialect
