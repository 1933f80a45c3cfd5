"""`gateway demo` as a user runs it: a real process (issue 25)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
from pathlib import Path

import httpx

from tests.forkserver import PIPE, python_m
from tests.servers import free_port


async def test_busy_port_is_one_line_and_leaves_nothing_behind(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = await python_m(
            "gateway",
            "demo",
            "--port",
            str(port),
            # The demo's temporary folder is made under TMPDIR: here, where it can be seen.
            env={**os.environ, "TMPDIR": str(tmp_path)},
            stdout=PIPE,
            stderr=PIPE,
        )
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    assert proc.returncode == 1
    assert err.decode().splitlines() == [
        f"gateway demo: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    assert out == b""
    assert not list(tmp_path.glob("gateway-demo-*"))  # noqa: ASYNC240


async def test_demo_answers_with_one_date_and_one_server_header(tmp_path: Path) -> None:
    port = free_port()
    proc = await python_m(
        "gateway",
        "demo",
        "--port",
        str(port),
        env={**os.environ, "TMPDIR": str(tmp_path)},
        stdout=PIPE,
        stderr=PIPE,
    )
    assert proc.stdout is not None
    try:
        printed = b""
        async with asyncio.timeout(30):
            while b"Ctrl-C stops the demo" not in printed:
                line = await proc.stdout.readline()
                assert line, "the demo ended before it was ready"
                printed += line
        match = re.search(rb"Bearer (gwk_[^']+)'", printed)
        assert match is not None, printed
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.post(
                f"http://127.0.0.1:{port}/v1/chat-messages",
                json={"query": "Xin chào", "inputs": {}, "response_mode": "blocking"},
                headers={"Authorization": f"Bearer {match.group(1).decode()}"},
            )
        assert response.status_code == 200
        # The fake Dify's own date and server headers are not relayed beside uvicorn's.
        assert len(response.headers.get_list("date")) == 1
        assert len(response.headers.get_list("server")) == 1
    finally:
        proc.terminate()
        async with asyncio.timeout(30):
            await proc.communicate()
