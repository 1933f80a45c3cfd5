"""The chat-history window: conversation and message lists limited to the plan's
``chat_history_days`` (pure logic, no I/O).

Dify pages these lists (docs/upstreams/dify.md, "Endpoints"): conversations newest first by
default (``sort_by=-updated_at``; ``has_more`` means older ones follow), messages
oldest first within a page that pages backwards (``has_more`` means older ones
precede). Items are only ever removed from the old end, so once something was
cut, everything beyond it is out of the window too and ``has_more`` becomes false.
``limit`` is echoed unchanged: it is what was asked for.
"""

from __future__ import annotations

from typing import Any

# Conversations sorted by these ascend in time: the old end is the front.
_ASCENDING = frozenset({"created_at", "updated_at"})


def _timestamp(item: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    stamps = [item[k] for k in keys if isinstance(item.get(k), int | float)]
    return max(stamps) if stamps else None


def _inside(item: object, cutoff: float, keys: tuple[str, ...]) -> bool:
    if not isinstance(item, dict):
        return True
    stamp = _timestamp(item, keys)
    # An item without a timestamp is kept: the window cannot place it.
    return stamp is None or stamp >= cutoff


def filter_conversations(
    page: dict[str, Any], cutoff: float, *, sort_by: str = "-updated_at"
) -> dict[str, Any]:
    """Keep the conversations active (created or updated) at or after ``cutoff``."""
    data = page.get("data")
    if not isinstance(data, list):
        return page
    kept = [item for item in data if _inside(item, cutoff, ("created_at", "updated_at"))]
    if len(kept) == len(data):
        return page
    has_more = bool(page.get("has_more"))
    if sort_by.lstrip("-") in _ASCENDING and not sort_by.startswith("-"):
        # Oldest first: the removed ones were at the front; newer pages still follow.
        return {**page, "data": kept, "has_more": has_more}
    return {**page, "data": kept, "has_more": False}


def filter_variables(page: dict[str, Any], cutoff: float) -> dict[str, Any]:
    """Keep a conversation's variables set (created or updated) at or after
    ``cutoff``: a chatflow's memory of the conversation is its history too
    (review-limits F3). A variable updated since holds what it holds now."""
    return _newer(page, cutoff, ("created_at", "updated_at"))


def filter_messages(page: dict[str, Any], cutoff: float) -> dict[str, Any]:
    """Keep the messages created at or after ``cutoff``."""
    return _newer(page, cutoff, ("created_at",))


def _newer(page: dict[str, Any], cutoff: float, fields: tuple[str, ...]) -> dict[str, Any]:
    """``page`` with the items of its ``data`` dated (by any of ``fields``) at
    or after ``cutoff``; none further back is shown (``has_more`` false)."""
    data = page.get("data")
    if not isinstance(data, list):
        return page
    kept = [item for item in data if _inside(item, cutoff, fields)]
    if len(kept) == len(data):
        return page
    return {**page, "data": kept, "has_more": False}
