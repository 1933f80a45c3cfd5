"""Sampling the gateway under load with py-spy, and summarising where its time goes.

``py-spy record --native --format raw`` writes collapsed stacks: one line per
distinct stack, ``frame;frame;...;leaf COUNT``, each frame ``function (file:line)``,
Python frames and C frames (the interpreter, uvloop, extension modules) mixed.
From them, as shares of all samples:

- ``garbage collection``: samples with the cyclic garbage collector on the stack
  (it runs at whatever allocation crosses a threshold, so it is not charged to
  that caller);
- ``by_package``: the package of the innermost Python frame, that is the Python
  code actually running (the gateway, httpx, aiohttp, asyncio, ...);
- ``gateway_inclusive``: each gateway function with the share of samples in
  which it is on the stack (itself and everything it calls);
- ``gateway_attributed``: each sample given to the innermost gateway frame on
  its stack, that is the gateway function whose own code or direct library
  calls were running; samples with no gateway frame (the event loop, uvicorn's
  parsing, the transport reading the upstream) are ``outside gateway code``.

A thread of a pool waiting for work (the SQLite connection's thread between
batches, its checkpoint thread) is sampled as running by ``--native``; those
samples are counted apart (``idle_pool``) and left out of the shares.
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
GC = "garbage collection"
_LOOP = "event loop (uvloop, C)"
# Innermost C frames that are system calls. A sample inside a socket write also
# covers the time the process waits to run again after waking the receiver: on a
# busy machine the woken process often takes the CPU at once.
_SYSCALLS = {
    "write": "socket writes (write, send*)",
    "writev": "socket writes (write, send*)",
    "send": "socket writes (write, send*)",
    "sendto": "socket writes (write, send*)",
    "sendmsg": "socket writes (write, send*)",
    "read": "socket reads (read, recv*)",
    "recv": "socket reads (read, recv*)",
    "recvfrom": "socket reads (read, recv*)",
    "recvmsg": "socket reads (read, recv*)",
    "epoll_wait": "epoll_wait",
    "epoll_pwait": "epoll_wait",
}
# A pool thread waiting for work (concurrent.futures' worker, no work item running).
_POOL_WORKER = "_worker (concurrent/futures/thread.py)"
_POOL_WORK = "_WorkItem.run (concurrent/futures/thread.py)"
# The process's start-up frames sit at the root of every stack: not request work.
_ROOT_FRAMES = ("gateway/__main__.py", "gateway/cli.py")


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


def _is_python(location: str) -> bool:
    return location.endswith(".py") or location.startswith("<")


def _package(location: str) -> str:
    if location.startswith("<"):
        return "(frozen stdlib)"
    return location.split("/", 1)[0].removesuffix(".py")


@dataclass
class Profile:
    samples: int = 0
    idle_pool: int = 0  # samples of pool threads waiting for work, not in ``samples``
    by_package: Counter[str] = field(default_factory=Counter)
    gateway_inclusive: Counter[str] = field(default_factory=Counter)
    gateway_attributed: Counter[str] = field(default_factory=Counter)
    leaves: Counter[str] = field(default_factory=Counter)
    syscalls: Counter[str] = field(default_factory=Counter)

    def top(self, counter: Counter[str], n: int = 15) -> list[tuple[str, float]]:
        return [(name, 100 * count / self.samples) for name, count in counter.most_common(n)]

    def as_json(self, n: int = 20) -> dict[str, object]:
        return {
            "samples": self.samples,
            "idle_pool_samples": self.idle_pool,
            "gc_pct": 100 * self.by_package[GC] / self.samples if self.samples else 0.0,
            "by_package_pct": dict(self.top(self.by_package, n)),
            "gateway_inclusive_pct": dict(self.top(self.gateway_inclusive, n)),
            "gateway_attributed_pct": dict(self.top(self.gateway_attributed, n)),
            "python_leaf_pct": dict(self.top(self.leaves, n)),
            "syscall_pct": dict(self.top(self.syscalls, n)),
        }


def summarise(lines: Iterable[str], repo: Path) -> Profile:
    profile = Profile()
    for line in lines:
        stack, _, count_text = line.rstrip("\n").rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames: list[tuple[str, str]] = []  # (location:function, location)
        collecting = False
        raws = stack.split(";")
        if _POOL_WORKER in raws and _POOL_WORK not in raws:
            profile.idle_pool += count
            continue
        syscall = _SYSCALLS.get(raws[-1].split(" (", 1)[0])
        if syscall:
            profile.syscalls[syscall] += count
        for raw in raws:
            match = _FRAME.match(raw)
            if match is None:
                continue
            collecting = collecting or match["func"].startswith("gc_collect")
            location = _where(match["path"], repo)
            frames.append((f"{location}:{match['func']}", location))
        if not frames:
            continue
        profile.samples += count
        python = [(name, loc) for name, loc in frames if _is_python(loc)]
        own = [
            name
            for name, loc in python
            if loc.startswith("gateway/") and not loc.startswith(_ROOT_FRAMES)
        ]
        for name in set(own):
            profile.gateway_inclusive[name] += count
        if collecting:
            profile.by_package[GC] += count
            profile.gateway_attributed[GC] += count
            profile.leaves[GC] += count
            continue
        leaf_name, leaf_location = python[-1] if python else (_LOOP, _LOOP)
        if leaf_name == "asyncio/runners.py:Runner.run":
            # Only the runner above: uvloop's own C code (polling, socket I/O, timers).
            leaf_name = leaf_location = _LOOP
        profile.leaves[leaf_name] += count
        profile.by_package[_package(leaf_location)] += count
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
    argv += ["--native", "-f", "raw", "--nolineno", "-o", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not out.exists():
        return f"py-spy failed: {done.stderr.strip()[-500:]}"
    return summarise(out.read_text().splitlines(), Path(__file__).resolve().parent.parent)
