"""``python tests/dropdb.py ADMIN_DSN NAME...``: drop a test run's PostgreSQL
databases, each ``WITH (FORCE)``.

The run's last step, started detached by tests/conftest.py so that the run does
not wait for it: each ``DROP DATABASE`` makes PostgreSQL 15 take an immediate
checkpoint, which at the end of a run writes out every buffer the run left
dirty - 0.6-2.5 s for each pytest-xdist worker, measured, after its last test.
"""

from __future__ import annotations

import asyncio
import sys

import asyncpg


async def drop(admin_dsn: str, names: list[str]) -> None:
    conn = await asyncpg.connect(admin_dsn, timeout=5)
    try:
        for name in names:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(drop(sys.argv[1], sys.argv[2:]))
