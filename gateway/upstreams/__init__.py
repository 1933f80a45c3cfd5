"""Upstream dialects: everything specific to one chat API sits behind `Upstream`."""

from __future__ import annotations

from gateway.upstreams.base import Route, StreamMeter, Upstream

__all__ = ["Route", "StreamMeter", "Upstream", "get_upstream"]


def get_upstream(kind: str) -> Upstream:
    """The dialect for an `upstream.kind` setting."""
    if kind == "dify":
        from gateway.upstreams.dify import DifyUpstream

        return DifyUpstream()
    raise ValueError(f"unknown upstream kind {kind!r}")
