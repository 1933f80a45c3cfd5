"""Database URLs the fixtures have migrated already (tests/conftest.py: each test's
SQLite copy, the pytest process's PostgreSQL database): for those
`tests.harness.running_gateway` skips its own migrate, a no-op there (~2.5 ms of
Python and as much of PostgreSQL's CPU, on a new connection, per gateway). The
gateway's start still migrates, as in production.

A module of its own so that conftest does not import the harness, and with it
the gateway's app, in pytest-xdist's controller, which runs no test."""

from __future__ import annotations

MIGRATED: set[str] = set()
