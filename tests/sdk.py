"""The vendors' official SDKs (openai, anthropic), imported when a test first uses
one rather than when pytest collects its module.

Importing them costs ~2 s of CPU (anthropic 1.3 s, openai 0.6 s: pydantic
building their hundreds of models), most of a pytest process's collection. Their
tests are one xdist group (``SDK``, `--dist loadgroup` in pyproject.toml's
addopts), so in a run of the whole suite one worker imports them, and only once it
runs the first of those tests; collecting stays cheap for all.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest

SDK = pytest.mark.xdist_group("sdk")
"""The mark of a module of SDK tests (its ``pytestmark``): the whole group runs on
one xdist worker, the only one to import the SDKs."""


class _Lazy:
    """A module imported at the first use of one of its public attributes. Not
    `importlib.util.LazyLoader`'s lazy module: pytest, collecting the test module,
    looks at every global's attributes (``__class__``, ``__test__``, fixture
    markers), and any attribute of that imports it. Here the names that start with
    an underscore are the proxy's own, so collecting imports nothing."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy(name: str) -> Any:
    """Module ``name``, imported when the first test uses it."""
    return _Lazy(name)
