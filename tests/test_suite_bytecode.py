"""The rewritten bytecode the xdist controller writes before it starts the workers
(tests/bytecode.py) is the one pytest's import hook reads in a worker."""

from __future__ import annotations

from pathlib import Path

import pytest
from _pytest.assertion import rewrite

from tests.bytecode import _current, rewritten


def test_the_controllers_rewritten_bytecode_is_what_a_worker_reads(
    tmp_path: Path, pytestconfig: pytest.Config
) -> None:
    source = tmp_path / "test_sample.py"
    source.write_text("def test_sum():\n    total = 1 + 1\n    assert total == 3\n")
    pyc = tmp_path / "__pycache__" / f"test_sample{rewrite.PYC_TAIL}"
    assert not _current(source, pyc)
    assert rewritten(source, pytestconfig) == pyc
    assert _current(source, pyc)
    code = rewrite._read_pyc(source, pyc)  # what AssertionRewritingHook.exec_module runs
    assert code is not None
    namespace: dict[str, object] = {}
    exec(code, namespace)
    with pytest.raises(AssertionError, match=r"assert 2 == 3"):  # the rewritten message
        namespace["test_sum"]()  # type: ignore[operator]
    # A changed source makes it stale, and it is written again.
    source.write_text("def test_sum():\n    assert 1 + 1 == 2\n")
    assert not _current(source, pyc)
    rewritten(source, pytestconfig)
    assert _current(source, pyc)
