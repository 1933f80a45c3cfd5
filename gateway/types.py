"""The ASGI type aliases, defined once for every module (as Starlette keeps them in
``starlette/types.py``; the spec: https://asgi.readthedocs.io/en/latest/specs/main.html).

They are Starlette's own definitions, so an app or endpoint typed with either set
passes for the other.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeAlias

__all__ = ["ASGIApp", "Message", "Receive", "Scope", "Send"]

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]
