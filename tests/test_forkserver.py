"""The test processes: `python -m` children forked from the pre-imported server
are the processes a fresh start would be (tests/forkserver.py), a
`gateway serve` that does not become ready is killed with its workers
(tests/servers.py), and a test that changes the pytest process's environment
fails (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import certifi
import pytest

from tests import forkserver
from tests.conftest import process_state_kept
from tests.forkserver import PIPE, ForkedProcess, _Client, python_m
from tests.servers import free_port, kill_tree, spawn_gateway, wait_ready

forking = pytest.mark.skipif(not forkserver.FORKING, reason="GATEWAY_TEST_FORK=0")


async def probe(*args: str, env: dict[str, str], fork: bool) -> tuple[int, dict[str, Any], str]:
    """Run tests/probe.py: (exit status, its state, its stderr)."""
    if fork:
        proc = await python_m("tests.probe", *args, env=env, stdout=PIPE, stderr=PIPE)
        assert isinstance(proc, ForkedProcess)
    else:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.probe",
            *args,
            env=env,
            stdout=PIPE,
            stderr=PIPE,
            start_new_session=True,
        )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert out is not None and err is not None
    assert proc.returncode is not None
    return proc.returncode, json.loads(out), err.decode()


@forking
async def test_a_forked_child_is_what_a_fresh_python_m_would_be(tmp_path: Path) -> None:
    env = {**os.environ, "PROBE": "é x", "TMPDIR": str(tmp_path)}
    env.pop("HOME", None)  # a variable of the server's that the child has not
    # An exec'd child inherits the signals its parent ignores: a forked one too.
    before = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        forked = await probe("3", env=env, fork=True)
        fresh = await probe("3", env=env, fork=False)
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert forked[0] == fresh[0] and forked[2] == fresh[2]
    differ = {
        key: (forked[1][key], fresh[1][key]) for key in fresh[1] if forked[1][key] != fresh[1][key]
    }
    assert differ == {}  # (forked, fresh)
    status, state, err = forked
    assert status == 3 and err == "probe: on stderr\n"
    assert state["name"] == "__main__" and state["spec"] == "tests.probe"
    assert state["argv"][0].endswith("tests/probe.py") and state["argv"][1:] == ["3"]
    assert state["env"] == env and state["tempdir"] == str(tmp_path)
    assert state["own_session"] and state["own_group"]
    assert state["signals"][str(int(signal.SIGUSR1))] == repr(signal.SIG_IGN)
    assert state["fds"] == [0, 1, 2, 3]  # the standard streams, and listdir's own


@pytest.fixture
def one_ca(tmp_path: Path) -> Path:
    """A CA bundle of one certificate (certifi's first)."""
    first = Path(certifi.where()).read_text().split("-----END CERTIFICATE-----")[0]
    (tmp_path / "one.pem").write_text(first + "-----END CERTIFICATE-----\n")
    return tmp_path / "one.pem"


@forking
async def test_a_child_told_of_other_ca_certificates_loads_them(one_ca: Path) -> None:
    """The fork server's children share its httpx default SSL context (built once,
    tests/forkserver.py), which SSL_CERT_FILE chooses: a child given another file
    loads that one, as a fresh process does."""
    env = {**os.environ, "SSL_CERT_FILE": str(one_ca)}
    env.pop("SSL_CERT_DIR", None)
    _, default, _ = await probe(env=dict(os.environ), fork=True)
    _, forked, _ = await probe(env=env, fork=True)
    _, fresh, _ = await probe(env=env, fork=False)
    assert len(forked["ca_certs"]) == 1 and forked["ca_certs"] == fresh["ca_certs"]
    assert len(default["ca_certs"]) > 1


@forking
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PYTHONHASHSEED", "7"),
        # Read by aiohttp, yarl and multidict at import (review): a forked child
        # would run their C code, imported by the server, while asked for Python.
        ("AIOHTTP_NO_EXTENSIONS", "1"),
        ("YARL_NO_EXTENSIONS", "1"),
        ("MULTIDICT_NO_EXTENSIONS", "1"),
    ],
)
async def test_a_child_is_started_afresh_where_the_interpreter_reads_the_environment(
    name: str, value: str
) -> None:
    proc = await python_m("tests.probe", env={**os.environ, name: value}, stdout=PIPE, stderr=PIPE)
    assert not isinstance(proc, ForkedProcess)
    out, _ = await proc.communicate()
    assert json.loads(out)["env"][name] == value


@forking
async def test_a_start_cancelled_while_forking_leaves_no_child_running() -> None:
    """Review: the fork was asked for from a thread, which a cancelled start left
    to finish: the child it made ran on, with nobody to stop it."""
    client = forkserver._forking()
    assert client is not None
    asked, go = threading.Event(), threading.Event()
    made: list[int] = []
    fork = client.fork

    def held(*args: Any) -> int:
        asked.set()
        go.wait()
        made.append(fork(*args))
        return made[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(client, "fork", held)
        start = asyncio.ensure_future(
            python_m("tests.probe", "pause", env=os.environ, stdout=PIPE, stderr=PIPE)
        )
        async with asyncio.timeout(30):
            await asyncio.to_thread(asked.wait)
            start.cancel()
            go.set()
            with pytest.raises(asyncio.CancelledError):
                await start
    try:
        assert len(made) == 1  # forked, and by now ended and reaped
        assert client.exits.get(made[0]) == -signal.SIGKILL
    finally:
        if made and client.exits.get(made[0]) is None:
            os.kill(made[0], signal.SIGKILL)


@contextlib.asynccontextmanager
async def paused() -> AsyncIterator[ForkedProcess]:
    """A forked probe waiting for a signal; killed after the test if it still runs."""
    proc = await python_m("tests.probe", "pause", env=os.environ, stdout=PIPE, stderr=PIPE)
    assert isinstance(proc, ForkedProcess)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)


@forking
async def test_a_signal_ends_a_forked_child_with_its_number() -> None:
    async with paused() as proc, asyncio.timeout(30):
        assert proc.stdout is not None
        await proc.stdout.readline()  # it has printed its state: now in signal.pause()
        assert proc.returncode is None
        proc.terminate()
        assert await proc.wait() == -signal.SIGTERM
    assert proc.returncode == -signal.SIGTERM
    assert await proc.stdout.read() == b""


@forking
async def test_a_wait_ends_when_the_fork_server_has_gone() -> None:
    async with paused() as proc, asyncio.timeout(30):
        assert proc.stdout and proc.stderr
        await proc.stdout.readline()
        server = forkserver._forking()
        assert server is not None
        server.server.kill()
        with pytest.raises(RuntimeError, match="the fork server has gone"):
            await proc.wait()
        os.kill(proc.pid, signal.SIGKILL)  # no server to kill what it forked
        await proc.stdout.read()
        await proc.stderr.read()
    assert forkserver._forking() is not server  # the next fork starts a new one
    again = await python_m("tests.probe", env=os.environ, stdout=PIPE, stderr=PIPE)
    await again.communicate()
    assert again.returncode == 0


@contextlib.asynccontextmanager
async def two_workers(tmp_path: Path, port: int) -> AsyncIterator[Any]:
    config = tmp_path / "gateway.toml"
    config.write_text(
        "[server]\nreload_interval = 0\n\n"
        f'[database]\nurl = "sqlite:///{tmp_path}/gateway.db"\nspool_file = ""\n\n[plans.free]\n'
    )
    proc = await spawn_gateway(config, port, workers=2)
    try:
        yield proc
    finally:
        kill_tree(proc)
        await proc.wait()


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (its workers, and multiprocessing's resource
    tracker that starting them started)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rpartition(")")[2].split()[1]) == pid:
                    found.append(int(entry))
    return found


def spawned_workers(pids: list[int]) -> list[int]:
    return [pid for pid in pids if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


async def ended(pid: int) -> None:
    """Until process ``pid`` has ended (its pidfd turns readable)."""
    fd = os.pidfd_open(pid)
    try:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        loop.add_reader(fd, done.set_result, None)
        try:
            await done
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


async def test_a_gateway_not_ready_in_time_is_killed_with_its_workers(tmp_path: Path) -> None:
    port = free_port()
    async with two_workers(tmp_path, port) as proc:
        await wait_ready(proc, port, 2)
        started = children(proc.pid)
        assert len(spawned_workers(started)) == 2
        exits = [asyncio.ensure_future(ended(pid)) for pid in started]
        with pytest.raises(TimeoutError):
            await wait_ready(proc, port, 3, timeout=0.1)  # a third worker never comes
        assert proc.returncode == -signal.SIGKILL
        async with asyncio.timeout(10):
            await asyncio.gather(*exits)


def test_a_reused_pid_is_not_an_exited_process() -> None:
    """Review: exits were kept by pid for the life of the pytest process, so a
    later child given a pid an earlier one had (pids wrap at pid_max) read as
    exited: its kill sent nothing and its wait answered the other's status."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client = _Client.__new__(_Client)  # its reader alone, fed what a server sends
    client.sock, client.lock, client.condition = mine, threading.Lock(), threading.Condition()
    client.pids, client.exits, client.waiters, client.gone = [], {}, {}, False
    with theirs:
        for message in ({"pid": 4242}, {"exit": 4242, "code": 0}, {"pid": 4242}):
            theirs.send(json.dumps(message).encode())
    client._read()  # to the end: the server's side is closed
    mine.close()
    later = ForkedProcess(client, 4242, [None, None])
    assert later.returncode is None  # running: nothing said this one exited


def test_a_test_that_changes_the_process_state_fails_and_it_is_put_back() -> None:
    """tests/conftest.py's check after every test: the process's environment and
    SIGTERM handler as they were (an in-process `gateway serve` set both)."""
    before = signal.getsignal(signal.SIGTERM)
    path = os.environ["PATH"]
    with pytest.raises(
        AssertionError, match=r"changed the environment: \['GATEWAY_GC_TUNING', 'PATH'\]"
    ):
        with process_state_kept():
            os.environ["GATEWAY_GC_TUNING"] = "1"
            del os.environ["PATH"]
    assert "GATEWAY_GC_TUNING" not in os.environ and os.environ["PATH"] == path
    with pytest.raises(AssertionError, match="left a SIGTERM handler"):
        with process_state_kept():
            signal.signal(signal.SIGTERM, lambda *_: None)
    assert signal.getsignal(signal.SIGTERM) is before
    with process_state_kept():  # and what is put back is no change
        os.environ["GATEWAY_GC_TUNING"] = "1"
        del os.environ["GATEWAY_GC_TUNING"]
