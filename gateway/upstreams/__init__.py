"""Upstream dialects: everything specific to one chat API sits behind `Upstream`.

`DIALECTS` is the registry: each ``upstream.kind`` setting and the class that
implements it, imported only when chosen. The configuration accepts exactly its
keys.
"""

from __future__ import annotations

import importlib
from typing import Final

from gateway.upstreams.base import Prepared, Route, StreamMeter, StreamTransform, Upstream

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
    "dify": "gateway.upstreams.dify:DifyUpstream",
}


def get_upstream(kind: str) -> Upstream:
    """The dialect for an `upstream.kind` setting."""
    target = DIALECTS.get(kind)
    if target is None:
        raise ValueError(f"unknown upstream kind {kind!r}")
    module, _, name = target.partition(":")
    dialect: Upstream = getattr(importlib.import_module(module), name)()
    return dialect
