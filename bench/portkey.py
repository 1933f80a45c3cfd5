"""Portkey's open-source AI gateway (npm ``@portkey-ai/gateway``), a peer of the
gateway in the OpenAI phase (bench/litellm.py): no database, no budgets, the same
fake upstream, reached as an OpenAI provider with a custom host.

It is installed once into a cache directory outside the repository (never into it,
and never at run time: a run without it skips Portkey and says why)::

    python -m bench.portkey install      # npm install into ~/.cache/gateway-bench/portkey

``BENCH_PORTKEY_DIR`` names another cache directory; ``BENCH_PORTKEY`` the
``start-server.js`` of another install. Node is the machine's ``node``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = "@portkey-ai/gateway"
VERSION = "1.15.2"
_SCRIPT = Path("node_modules") / "@portkey-ai" / "gateway" / "build" / "start-server.js"


def cache_dir() -> Path:
    explicit = os.environ.get("BENCH_PORTKEY_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gateway-bench" / "portkey"


def script() -> Path:
    explicit = os.environ.get("BENCH_PORTKEY")
    return Path(explicit) if explicit else cache_dir() / _SCRIPT


def missing() -> str | None:
    """Why Portkey cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "node not found (apt-get install -y nodejs)"
    if not script().is_file():
        return f"not installed at {script()} (python -m bench.portkey install)"
    return None


def argv(port: int) -> list[str]:
    node = shutil.which("node")
    assert node is not None
    # --headless: no log-viewer UI routes; the API is the same.
    return [node, str(script()), f"--port={port}", "--headless"]


def env(base: dict[str, str]) -> dict[str, str]:
    return {**base, "NODE_ENV": "production"}


def headers(upstream_port: int) -> dict[str, str]:
    """What tells Portkey where to send a request: the OpenAI provider, at the fake
    upstream (127.0.0.1 is one of its default trusted custom hosts)."""
    return {
        "x-portkey-provider": "openai",
        "x-portkey-custom-host": f"http://127.0.0.1:{upstream_port}/v1",
    }


def install() -> int:
    npm = shutil.which("npm")
    if npm is None:
        print("bench.portkey: npm not found (apt-get install -y npm)", file=sys.stderr)
        return 2
    target = cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    command = [npm, "install", "--prefix", str(target), "--no-audit", "--no-fund"]
    command.append(f"{PACKAGE}@{VERSION}")
    print(" ".join(command))
    return subprocess.run(command, check=False).returncode


def main(args: list[str]) -> int:
    if args == ["install"]:
        return install()
    if args == ["where"]:
        print(missing() or script())
        return 0
    print("usage: python -m bench.portkey install|where", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
