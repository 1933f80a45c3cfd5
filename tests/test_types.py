"""The ASGI aliases live in gateway/types.py only, and are Starlette's."""

from __future__ import annotations

import ast
import pathlib

import starlette.types

import gateway
from gateway import types

PACKAGE = pathlib.Path(gateway.__file__).parent
ALIASES = {"Scope", "Message", "Receive", "Send", "ASGIApp", "App"}


def _alias_definitions(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        found += [t.id for t in targets if isinstance(t, ast.Name) and t.id in ALIASES]
    return found


def test_no_module_but_types_defines_an_asgi_alias() -> None:
    defined = {
        str(path.relative_to(PACKAGE)): names
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "types.py" or path.parent != PACKAGE
        if (names := _alias_definitions(path))
    }
    assert defined == {}
    assert set(_alias_definitions(PACKAGE / "types.py")) == ALIASES - {"App"}


def test_the_aliases_are_starlettes() -> None:
    for name in ("Scope", "Message", "Receive", "Send", "ASGIApp"):
        assert getattr(types, name) == getattr(starlette.types, name), name
