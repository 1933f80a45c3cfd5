from __future__ import annotations

from typing import Any

from gateway.upstreams.dify_history import filter_conversations, filter_messages

CUTOFF = 1_000


def conv(cid: str, created: int, updated: int) -> dict[str, Any]:
    return {"id": cid, "created_at": created, "updated_at": updated}


def test_conversations_newest_first_are_cut_at_the_old_end() -> None:
    page = {
        "limit": 3,
        "has_more": True,
        "data": [conv("a", 900, 1500), conv("b", 1000, 1000), conv("c", 500, 999)],
    }
    assert filter_conversations(page, CUTOFF) == {
        "limit": 3,
        "has_more": False,
        "data": page["data"][:2],
    }


def test_conversations_inside_the_window_are_untouched() -> None:
    page = {"limit": 2, "has_more": True, "data": [conv("a", 2000, 2000), conv("b", 1500, 1500)]}
    assert filter_conversations(page, CUTOFF) is page


def test_conversations_sorted_oldest_first_keep_has_more() -> None:
    page = {"limit": 2, "has_more": True, "data": [conv("old", 10, 10), conv("new", 2000, 2000)]}
    result = filter_conversations(page, CUTOFF, sort_by="updated_at")
    assert result == {"limit": 2, "has_more": True, "data": [conv("new", 2000, 2000)]}


def test_messages_cut_at_the_old_end() -> None:
    page = {
        "limit": 3,
        "has_more": True,
        "data": [
            {"id": "1", "created_at": 999},
            {"id": "2", "created_at": 1000},
            {"id": "3", "created_at": 5000},
        ],
    }
    assert filter_messages(page, CUTOFF) == {
        "limit": 3,
        "has_more": False,
        "data": page["data"][1:],
    }


def test_a_conversation_entirely_outside_the_window_is_an_empty_page() -> None:
    page = {
        "limit": 20,
        "has_more": True,
        "data": [{"id": "1", "created_at": 1}, {"id": "2", "created_at": 2}],
    }
    assert filter_messages(page, CUTOFF) == {"limit": 20, "has_more": False, "data": []}


def test_odd_pages_are_passed_through() -> None:
    assert filter_messages({"data": "x"}, CUTOFF) == {"data": "x"}
    odd = {"limit": 1, "has_more": False, "data": [{"id": "no-time"}, "not-an-object"]}
    assert filter_messages(odd, CUTOFF) is odd
