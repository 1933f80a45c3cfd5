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

import importlib.util
import sys
from pathlib import Path

import pytest
from _pytest.assertion import rewrite
from _pytest.assertion.rewrite import assertstate_key
from _pytest.pathlib import fnmatch_ex

sys.dont_write_bytecode = False


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Under pytest-xdist, the controller rewrites the test modules whose rewritten
    bytecode is missing or stale before it starts the workers (xdist starts them
    in its own `pytest_sessionstart`, which runs last). Otherwise every worker
    rewrote all of them at once on a checkout without that bytecode (a new clone
    or worktree, or after an edit): four times the CPU, on two cores. Each
    worker still checks each module's bytecode against its source, as before."""
    config = session.config
    if (
        not config.pluginmanager.has_plugin("dsession")  # not a controller
        or config.getoption("assertmode") != "rewrite"
        or sys.dont_write_bytecode
    ):
        return
    patterns = config.getini("python_files")
    for folder in config.getini("testpaths"):
        for source in sorted((config.rootpath / folder).rglob("*.py")):
            if source.name == "conftest.py" or any(fnmatch_ex(p, source) for p in patterns):
                rewritten(source, config)


def rewritten(source: Path, config: pytest.Config) -> Path:
    """The rewritten bytecode of ``source`` where pytest's import hook looks for it
    (`AssertionRewritingHook.exec_module`), written unless it is current."""
    cache = rewrite.get_cache_dir(source)
    pyc = cache / (source.name[:-3] + rewrite.PYC_TAIL)
    if not _current(source, pyc) and rewrite.try_makedirs(cache):
        source_hash, code = rewrite._rewrite_test(source, config)
        rewrite._write_pyc(config.stash[assertstate_key], code, source_hash, pyc)
    return pyc


def _current(source: Path, pyc: Path) -> bool:
    """The rewritten bytecode's header matches the source (pytest's checked-hash
    pyc, `_pytest.assertion.rewrite._read_pyc`), read without loading the code."""
    try:
        with open(pyc, "rb") as fp:
            head = fp.read(16)
        source_hash = importlib.util.source_hash(source.read_bytes())
    except OSError:
        return False
    return head == importlib.util.MAGIC_NUMBER + b"\x03\x00\x00\x00" + source_hash[:8]
