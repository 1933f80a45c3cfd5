"""Plan features decided from request and answer bodies (pure logic, no I/O).

Which requests ask for web search or advanced RAG, and whether an answer used
web search, are app-specific: the operator names dotted paths into the JSON and
the values that count (``[web_search]``, ``[advanced_rag]`` in the config). A path
segment that meets a list applies to every element, so
``retriever_resources.source`` looks at each retrieved resource.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from gateway.config import AdvancedRagConfig, Scalar, WebSearchConfig


@functools.lru_cache(maxsize=256)
def _keys(path: str) -> tuple[str, ...]:
    # The paths are the configuration's few: split once, not on every request.
    return tuple(path.split("."))


def values_at(obj: object, path: str) -> Iterator[object]:
    """Every value found at a dotted path (none if the path is absent)."""
    if not path:
        return
    current: list[object] = [obj]
    for key in _keys(path):
        found: list[object] = []
        for node in current:
            for item in node if isinstance(node, list) else (node,):
                if isinstance(item, Mapping) and key in item:
                    found.append(item[key])
        current = found
    for value in current:
        if isinstance(value, list):
            yield from value
        else:
            yield value


def _as_text(value: object) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None


def matches(obj: object, path: str, values: Iterable[str]) -> bool:
    """Whether the value at ``path`` is one of ``values`` (compared as text)."""
    found = list(values_at(obj, path))
    if not found:  # the usual case: the request or answer does not mention it
        return False
    wanted = set(values)
    return any(_as_text(v) in wanted for v in found)


def asks_for_web_search(body: Mapping[str, Any], rule: WebSearchConfig) -> bool:
    return matches(body, rule.request_path, rule.request_values)


def asks_for_advanced_rag(body: Mapping[str, Any], rule: AdvancedRagConfig) -> bool:
    return matches(body, rule.request_path, rule.request_values)


def used_web_search(metadata: Mapping[str, Any] | None, rule: WebSearchConfig) -> bool:
    """Whether an answer says it searched the web (directly or as a fallback)."""
    if not metadata:
        return False
    return any(matches(metadata, path, rule.answer_values) for path in rule.answer_paths)


def set_path(body: dict[str, Any], path: str, value: Scalar) -> None:
    """Set a dotted path in a JSON object, creating objects on the way."""
    *parents, last = path.split(".")
    node = body
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[last] = value
