"""Plan features decided from request and answer bodies (pure logic, no I/O).

Which requests ask for web search or advanced RAG, and whether an answer used
web search, are app-specific: the operator names dotted paths into the JSON and
the values that count (``[web_search]``, ``[advanced_rag]`` in the config). A path
segment that meets a list applies to every element, so
``retriever_resources.source`` looks at each retrieved resource.

A request's values are judged as the upstream will read them, not as sent
(issue 20): Dify removes every NUL from a string input before the app sees it
(``BaseAppGenerator._sanitize_value``), so ``"advanced\\u0000"`` is advanced RAG;
it reads a checkbox input's ``" Yes"``, ``"on"`` or ``1`` as true, and a number
input's ``" 2"`` or ``"2.0"`` as the number 2. The body is
forwarded unchanged: what Dify makes of it is what was judged. docs/features.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

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


# Dify's reading of a checkbox input given as text (``_validate_inputs``, after
# ``strip().lower()``) or as the number 1 or 0.
_TRUE_TEXTS: Final = frozenset({"true", "1", "yes", "on"})
_FALSE_TEXTS: Final = frozenset({"false", "0", "no", "off"})


def _as_text(value: object) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # Dify strips NULs from string inputs (and the chat query): "web\u0000"
        # reaches the app as "web".
        return value.replace("\x00", "")
    if isinstance(value, int | float):
        return str(value)
    return None


def _as_checkbox(value: object) -> str | None:
    """``"true"`` or ``"false"`` if Dify would read ``value`` as that boolean
    in a checkbox input, else None."""
    if isinstance(value, bool):
        return None  # already compared as "true"/"false"
    if isinstance(value, str):
        text = value.replace("\x00", "").strip().lower()
        if text in _TRUE_TEXTS:
            return "true"
        if text in _FALSE_TEXTS:
            return "false"
    elif isinstance(value, int | float):
        if value == 1:
            return "true"
        if value == 0:
            return "false"
    return None


def _as_number(value: object) -> str | None:
    """The number Dify's number input makes of ``value``, as text, integral
    numbers without a fraction (``" 2"``, ``"2.0"`` and ``2.0`` are all ``"2"``);
    None if it makes none. Dify parses a string with ``float()`` when it holds a
    ".", else ``int()`` (which takes surrounding spaces and "2_0")."""
    number: int | float
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            number = float(value) if "." in value else int(value)
        except ValueError:
            return None
    elif isinstance(value, int | float):
        number = value
    else:
        return None
    if isinstance(number, float):
        if not math.isfinite(number):
            return None
        if number.is_integer():
            number = int(number)
    return str(number)


def _absent(obj: object, path: str) -> bool:
    """Whether ``path`` is missing from ``obj`` along objects alone - the usual
    case, each request asked whether it names advanced RAG and web search:
    found so without `values_at`'s generator and lists (issue 24). False when
    it may be there, or a list on the way needs the general walk."""
    if not path:
        return True
    node = obj
    for key in _keys(path):
        if not isinstance(node, Mapping):
            return not isinstance(node, list)  # (a list: each element is looked at)
        if key not in node:
            return True
        node = node[key]
    return False


def matches(obj: object, path: str, values: Iterable[str]) -> bool:
    """Whether the value at ``path`` is one of ``values``, compared as text after
    the upstream's own normalisation (see the module docstring): NULs removed, a
    value a checkbox reads as true or false taking that reading too, and one a
    number input reads as a number that number."""
    if _absent(obj, path):
        return False
    found = list(values_at(obj, path))
    if not found:  # the usual case: the request or answer does not mention it
        return False
    wanted = set(values)
    return any(
        _as_text(v) in wanted or _as_checkbox(v) in wanted or _as_number(v) in wanted for v in found
    )


def asks_for_web_search(body: Mapping[str, Any], rule: WebSearchConfig) -> bool:
    return matches(body, rule.request_path, rule.request_values)


def asks_for_advanced_rag(body: Mapping[str, Any], rule: AdvancedRagConfig) -> bool:
    return matches(body, rule.request_path, rule.request_values)


def turns_web_off(body: Mapping[str, Any], rule: WebSearchConfig) -> bool:
    """Whether a request's (or a conversation's) inputs hold the `disable`
    rewrite's value at its path: the app answers without the web."""
    value = rule.disable_value
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return matches(body, rule.disable_path, (text,))


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
