"""Fixtures the storage tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import behind_proxy, pg_address
from tests.tcpproxy import TCPProxy


@pytest.fixture
async def lost_cancels(postgres_dsn: str) -> AsyncIterator[tuple[str, TCPProxy]]:
    """A DSN through a forwarder that loses every CancelRequest."""
    proxy = TCPProxy(*pg_address(postgres_dsn), lose_cancels=True)
    # (sslmode=disable: the CancelRequest is then its connection's first bytes)
    async with behind_proxy(postgres_dsn, proxy, query="sslmode=disable") as dsn:
        yield dsn, proxy
