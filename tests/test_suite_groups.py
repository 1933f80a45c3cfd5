"""The suite's xdist groups hold (`--dist loadgroup`, tests/conftest.py): the
controller keeps a group on one worker only if the group is in the node ids the
workers report. Scattered, every worker imported the official SDKs and launched
Chromium (~4 s of CPU each)."""

from __future__ import annotations

import pytest

from tests.sdk import SDK

pytestmark = SDK


def test_a_grouped_test_reports_its_group_in_its_node_id(request: pytest.FixtureRequest) -> None:
    loadgroup = getattr(request.config.option, "loadgroup", False)  # on an xdist worker
    assert request.node.nodeid.endswith("@sdk") == loadgroup
