"""Real HTTP servers for tests: uvicorn on a free port, in the test's event loop.

Streaming, timing and disconnects need a real socket: the in-process test
clients buffer whole bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import uvicorn


@contextlib.asynccontextmanager
async def serve(app: Any, *, lifespan: str = "off", http: str = "auto") -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 and a free port; yields the base URL. ``http``
    names uvicorn's protocol ("h11", "httptools" or a "module:Class")."""
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan=lifespan,  # type: ignore[arg-type]
        http=http,  # type: ignore[arg-type]
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        # uvicorn exposes no "started" event; it sets the flag once it listens.
        while not server.started:
            if task.done():
                await task
                raise RuntimeError("server failed to start")
            await asyncio.sleep(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
