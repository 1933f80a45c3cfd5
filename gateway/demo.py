"""`gateway demo`: the gateway in front of a built-in fake Dify (demo_upstream.py), ready to curl.

Everything runs in one process and one event loop: the fake upstream on a free
port, the gateway on the requested port, a fresh SQLite database in a temporary
directory, a demo user with a key. The configuration file is written next to the
database so that `gateway --config ... users show demo-user` reads the same data.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn

from gateway.accounts import issue_key
from gateway.app import create_app
from gateway.config import ServerConfig, load_config
from gateway.demo_upstream import DemoDify
from gateway.logs import configure_logging
from gateway.storage import open_storage

DEMO_USER = "demo-user"

_CONFIG = """\
# Written by `gateway demo`.
[server]
port = {port}

[upstream]
kind = "dify"
url = "{upstream}"
api_key_env = "GATEWAY_DEMO_UPSTREAM_KEY"

[database]
url = "sqlite:///{db}"
spool_file = "{spool}"

[accounting]
timezone = "Asia/Ho_Chi_Minh"
default_plan = "free"

[plans.free]
queries_per_day = 50
tokens_per_day = 200000
web_searches_per_day = 5
advanced_rag = false
file_size_mb = 10
chat_history_days = 30
"""


def run_demo(*, port: int = 8000, host: str = "127.0.0.1", log: ServerConfig | None = None) -> int:
    configure_logging(log or ServerConfig())
    # The port is taken before anything else is made: a busy port is one line and
    # exit 1, with no temporary folder left behind (issue 25).
    try:
        listener = _listen(host, port)
    except OSError as exc:
        print(f"gateway demo: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 1
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_demo(host, listener))
    return 0


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # As uvicorn binds: a port left in TIME_WAIT by a previous run is reusable.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


async def _start(app: Any, sock: socket.socket) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    server = uvicorn.Server(
        # log_config=None: the demo's log is configured once (run_demo), in one format.
        uvicorn.Config(app, log_level="warning", lifespan="on", log_config=None)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task
            raise RuntimeError("the demo server stopped while starting")
        await asyncio.sleep(0.01)
    return server, task


async def _demo(host: str, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    folder = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    upstream_key = "app-demo-" + secrets.token_hex(8)
    fake = DemoDify(api_key=upstream_key)
    fake_socket = _listen(host, 0)
    fake_port = fake_socket.getsockname()[1]
    fake_server, fake_task = await _start(fake, fake_socket)

    config_path = folder / "gateway.toml"
    config_path.write_text(
        _CONFIG.format(
            port=port,
            upstream=f"http://{host}:{fake_port}/v1",
            db=folder / "gateway.db",
            spool=folder / "spool.jsonl",
        )
    )
    config = load_config(config_path, env={"GATEWAY_DEMO_UPSTREAM_KEY": upstream_key})

    storage = await open_storage(config.database)
    await storage.migrate()
    await storage.ensure_user(DEMO_USER, plan="free")
    _, secret = await issue_key(storage, DEMO_USER, name="demo", now=datetime.now(UTC))
    await storage.close()

    try:
        _, task = await _start(create_app(config), listener)
    except BaseException:
        fake_server.should_exit = True
        await fake_task
        raise
    base = f"http://{host}:{port}"
    print(
        f"""
Gateway demo: the gateway at {base}/v1 in front of a fake Dify at http://{host}:{fake_port}/v1
Database and configuration: {folder}

Ask a question as {DEMO_USER} (a streamed answer; the gateway records its usage):

  curl -N {base}/v1/chat-messages \\
    -H 'Authorization: Bearer {secret}' \\
    -H 'Content-Type: application/json' \\
    -d '{{"query": "Xin chào", "inputs": {{}}, "response_mode": "streaming", "user": "anyone"}}'

Then see what was recorded:

  gateway --config {config_path} users show {DEMO_USER}

Also try "response_mode": "blocking". Ctrl-C stops the demo.
""",
        flush=True,
    )
    sys.stdout.flush()
    try:
        await task
    finally:
        fake_server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await fake_task
