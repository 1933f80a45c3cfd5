"""Loaded first (``-p tests.bytecode`` in pyproject's addopts), before the plugins
of installed packages: with PYTHONDONTWRITEBYTECODE=1 (set in some environments,
this project's machines among them) pytest keeps none of the modules it rewrites
for its assertion messages, and it rewrites, besides the test modules, every
module of each package that ships a pytest plugin (all of hypothesis, anyio,
respx...): every pytest process compiled them all again at every run, about a
second of CPU each, and the test modules about 6 s (docs/testing.md).

The pytest process writes bytecode again, into the __pycache__ directories git
ignores; the processes the tests start keep the variable."""

from __future__ import annotations

import sys

sys.dont_write_bytecode = False
