"""Sampling the gateway under load with py-spy, and summarising where its time goes.

``py-spy record --format raw`` writes collapsed stacks: one line per distinct
stack, ``frame;frame;...;leaf COUNT``, each frame ``function (path)``. From
them:

- ``by_package``: where the CPU is, by the package of the innermost frame (the
  code actually running: the gateway, httpx, aiohttp, asyncio, ...);
- ``gateway_inclusive``: each gateway function with the share of samples in
  which it is on the stack (itself and everything it calls);
- ``gateway_attributed``: each sample given to the innermost gateway frame on
  its stack, that is the gateway function whose own code or direct library
  calls were running; samples with no gateway frame (the event loop, uvicorn's
  parsing, the transport reading the upstream) are ``outside gateway code``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<path>[^()]*?)(?::\d+)?\)$")
_SITE = re.compile(r".*/site-packages/")
_STDLIB = re.compile(r".*/lib/python3\.\d+/")


def _where(path: str, repo: Path) -> str:
    """A short location: ``gateway/proxy.py``, ``httpx/_client.py``, ``asyncio/events.py``."""
    repo_prefix = str(repo) + "/"
    if path.startswith(repo_prefix):
        return path[len(repo_prefix) :]
    for pattern in (_SITE, _STDLIB):
        short = pattern.sub("", path, count=1)
        if short != path:
            return short
    return path


def _package(location: str) -> str:
    head = location.split("/", 1)[0]
    return head.removesuffix(".py") if "/" in location or location.endswith(".py") else location


@dataclass
class Profile:
    samples: int = 0
    by_package: Counter[str] = field(default_factory=Counter)
    gateway_inclusive: Counter[str] = field(default_factory=Counter)
    gateway_attributed: Counter[str] = field(default_factory=Counter)
    leaves: Counter[str] = field(default_factory=Counter)

    def top(self, counter: Counter[str], n: int = 15) -> list[tuple[str, float]]:
        return [(name, 100 * count / self.samples) for name, count in counter.most_common(n)]

    def as_json(self, n: int = 20) -> dict[str, object]:
        return {
            "samples": self.samples,
            "by_package_pct": dict(self.top(self.by_package, n)),
            "gateway_inclusive_pct": dict(self.top(self.gateway_inclusive, n)),
            "gateway_attributed_pct": dict(self.top(self.gateway_attributed, n)),
            "leaf_functions_pct": dict(self.top(self.leaves, n)),
        }


def summarise(lines: Iterable[str], repo: Path) -> Profile:
    profile = Profile()
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = []
        for raw in stack.split(";"):
            match = _FRAME.match(raw)
            if match is None:
                frames.append((raw, raw))
                continue
            location = _where(match["path"], repo)
            frames.append((f"{location}:{match['func']}", location))
        if not frames:
            continue
        profile.samples += count
        leaf_name, leaf_location = frames[-1]
        profile.leaves[leaf_name] += count
        profile.by_package[_package(leaf_location)] += count
        own = [name for name, location in frames if location.startswith("gateway/")]
        for name in set(own):
            profile.gateway_inclusive[name] += count
        profile.gateway_attributed[own[-1] if own else "outside gateway code"] += count
    return profile


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else None


def record(pid: int, seconds: int, out: Path, *, rate: int = 200) -> Profile | str:
    """Sample ``pid`` for ``seconds`` into ``out`` (collapsed stacks); the summary, or
    why it failed."""
    spy = py_spy()
    if spy is None:
        return "py-spy not installed (pip install py-spy)"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [spy, "record", "-p", str(pid), "-d", str(seconds), "-r", str(rate)]
    argv += ["-f", "raw", "--nolineno", "-o", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not out.exists():
        return f"py-spy failed: {done.stderr.strip()[-500:]}"
    return summarise(out.read_text().splitlines(), Path(__file__).resolve().parent.parent)
