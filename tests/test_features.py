from __future__ import annotations

import random
from typing import Any

import pytest

from gateway.config import AdvancedRagConfig, WebSearchConfig
from gateway.features import (
    _absent,
    asks_for_advanced_rag,
    asks_for_web_search,
    matches,
    set_path,
    used_web_search,
    values_at,
)

RULE = WebSearchConfig()


@pytest.mark.parametrize(
    ("obj", "path", "found"),
    [
        ({"a": {"b": 1}}, "a.b", [1]),
        ({"a": {"b": 1}}, "a.c", []),
        ({"a": [{"b": 1}, {"b": 2}, {"c": 3}]}, "a.b", [1, 2]),
        ({"a": {"b": [1, 2]}}, "a.b", [1, 2]),
        ({"a": "text"}, "a.b", []),
        ({"a": 1}, "", []),
        ([{"a": 1}], "a", [1]),
    ],
)
def test_values_at(obj: Any, path: str, found: list[Any]) -> None:
    assert list(values_at(obj, path)) == found


@pytest.mark.parametrize(
    ("metadata", "used"),
    [
        ({"source": "web_search"}, True),
        ({"source": "kb_fallback_web"}, True),
        ({"source": "knowledge_base"}, False),
        ({"usage": {}}, False),
        ({}, False),
        (None, False),
        ({"source": ["kb", "web_search"]}, True),
    ],
)
def test_web_search_in_answer_metadata(metadata: dict[str, Any] | None, used: bool) -> None:
    assert used_web_search(metadata, RULE) is used


def test_web_search_paths_are_configurable() -> None:
    rule = WebSearchConfig(
        answer_paths=("retriever_resources.source", "tool"), answer_values=("tavily",)
    )
    assert used_web_search({"retriever_resources": [{"source": "kb"}, {"source": "tavily"}]}, rule)
    assert used_web_search({"tool": "tavily"}, rule)
    assert not used_web_search({"source": "web_search"}, rule)


@pytest.mark.parametrize(
    ("body", "asks"),
    [
        ({"inputs": {"search_mode": "web"}}, True),
        ({"inputs": {"search_mode": "kb"}}, False),
        ({"inputs": {}}, False),
        ({"query": "x"}, False),
        ({"inputs": "web"}, False),
    ],
)
def test_request_predicates(body: dict[str, Any], asks: bool) -> None:
    assert asks_for_web_search(body, RULE) is asks
    assert not asks_for_web_search(body, WebSearchConfig(request_path=""))


def test_predicates_compare_scalars_as_text() -> None:
    assert matches({"inputs": {"deep": True}}, "inputs.deep", ["true"])
    assert matches({"inputs": {"level": 2}}, "inputs.level", ["2"])
    assert not matches({"inputs": {"deep": {"x": 1}}}, "inputs.deep", ["true"])
    assert asks_for_advanced_rag({"inputs": {"rag_mode": "advanced"}}, AdvancedRagConfig())


def test_set_path() -> None:
    body: dict[str, Any] = {"inputs": {"q": 1}}
    set_path(body, "inputs.allow_web_fallback", False)
    assert body == {"inputs": {"q": 1, "allow_web_fallback": False}}
    other: dict[str, Any] = {"inputs": "not an object"}
    set_path(other, "inputs.x.y", "off")
    assert other == {"inputs": {"x": {"y": "off"}}}


# --- values as the upstream reads them (issue 20) ----------------------------------------


@pytest.mark.parametrize(
    ("value", "asks"),
    [
        ("{}", True),
        ("{}\x00", True),  # Dify strips NULs from string inputs
        ("\x00{}\x00\x00", True),
        ("{} ", False),  # whitespace is kept: the app sees "advanced "
        ("X{}", False),
        ("basic\x00", False),
        (["{}\x00"], True),
    ],
)
def test_feature_values_are_compared_after_dify_strips_nuls(value: Any, asks: bool) -> None:
    def filled(word: str) -> Any:
        return [v.format(word) for v in value] if isinstance(value, list) else value.format(word)

    assert (
        asks_for_advanced_rag({"inputs": {"rag_mode": filled("advanced")}}, AdvancedRagConfig())
        is asks
    )
    assert asks_for_web_search({"inputs": {"search_mode": filled("web")}}, RULE) is asks
    # Case is kept too: "Advanced" is not "advanced" to the app.
    assert not asks_for_advanced_rag({"inputs": {"rag_mode": "Advanced\x00"}}, AdvancedRagConfig())


@pytest.mark.parametrize(
    ("value", "asks"),
    [
        (True, True),
        ("true", True),
        (" Yes", True),
        ("ON\x00", True),
        ("1", True),
        (1, True),
        (1.0, True),
        ("maybe", False),
        (False, False),
        ("off", False),
        (0, False),
        (2, False),
    ],
)
def test_a_checkbox_value_matches_as_dify_reads_it(value: Any, asks: bool) -> None:
    # Dify reads a checkbox input given as "yes"/"on"/"1"/1 (stripped, any case) as true.
    rule = WebSearchConfig(request_path="inputs.web", request_values=("true",))
    assert asks_for_web_search({"inputs": {"web": value}}, rule) is asks


@pytest.mark.parametrize(
    ("value", "asks"),
    [
        (2, True),
        ("2", True),
        (" 2 ", True),  # Dify's number input: int(" 2 ") is 2
        ("2.0", True),  # float("2.0") is 2.0, which the app compares equal to 2
        (2.0, True),
        ("+2", True),
        ("2.5", False),
        ("two", False),
        ("", False),
        ("2\x00", True),  # Dify refuses it as a number; as text it is "2"
        (float("nan"), False),
        ("1" * 5000, False),  # past Python's digit limit: no number, no error
    ],
)
def test_a_number_matches_as_dify_reads_it(value: Any, asks: bool) -> None:
    rule = AdvancedRagConfig(request_path="inputs.level", request_values=("2",))
    assert asks_for_advanced_rag({"inputs": {"level": value}}, rule) is asks


def test_matches_without_the_general_walk_only_when_nothing_is_there() -> None:
    """`matches` answers False at once for a path missing along objects
    (issue 24): random documents and paths, the quick answer against
    `values_at`'s, each time it is given."""
    rng = random.Random(24)
    keys = ["a", "b", "c"]

    def document(depth: int) -> Any:
        roll = rng.random()
        if depth == 0 or roll < 0.2:
            return rng.choice([1, "on", "x", None, True, 2.0])
        if roll < 0.4:
            return [document(depth - 1) for _ in range(rng.randint(0, 3))]
        return {k: document(depth - 1) for k in keys if rng.random() < 0.6}

    quick = 0
    for _ in range(3000):
        obj = document(4)
        path = ".".join(rng.choice(keys) for _ in range(rng.randint(0, 3)))
        if _absent(obj, path):
            quick += 1
            assert list(values_at(obj, path)) == [], (obj, path)
            assert not matches(obj, path, ["1", "on", "x", "true", "2"])
    assert quick > 1000  # the quick answer was given often
