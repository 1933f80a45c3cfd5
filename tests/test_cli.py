from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from tests.forkserver import PIPE, python_m


@pytest.fixture
def config_file(tmp_path: Path, database_url: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[database]
url = "{database_url}"
spool_file = ""
[accounting]
timezone = "Asia/Ho_Chi_Minh"
default_plan = "free"
[plans.free]
queries_per_day = 50
[plans.pro]
queries_per_day = 1000
"""
    )
    return path


def run(config: Path, *args: str) -> int:
    return main(["--config", str(config), *args])


async def gateway(*args: str) -> tuple[int, str, str]:
    """`python -m gateway ARGS` run to its end: (exit status, stdout, stderr)."""
    proc = await python_m("gateway", *args, env=os.environ, stdout=PIPE, stderr=PIPE)
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None and out is not None and err is not None
    return proc.returncode, out.decode(), err.decode()


async def test_check_config_rejects_a_misspelt_key_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[plans.free]\nqueries_per_dya = 5\n")
    returncode, stdout, stderr = await gateway("--config", str(bad), "check-config")
    assert returncode == 2
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "plans.free.queries_per_dya" in lines[0]
    assert "Traceback" not in stderr


def test_check_config_prints_the_effective_configuration(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(config_file, "check-config") == 0
    out = capsys.readouterr().out
    assert "[plans.pro]" in out and "queries_per_day = 1000" in out


def test_migrate_twice(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(config_file, "migrate") == 0
    assert run(config_file, "migrate") == 0
    assert capsys.readouterr().out.count("is up to date") == 2


def test_users_and_keys(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(config_file, "users", "add", "alice") == 0
    assert run(config_file, "users", "add", "alice") == 1
    assert run(config_file, "users", "add", "bob", "--plan", "gold") == 2
    assert "no plan named 'gold'" in capsys.readouterr().err

    assert run(config_file, "users", "set-plan", "alice", "pro") == 0
    assert run(config_file, "users", "set-plan", "nobody", "pro") == 1
    assert run(config_file, "users", "set-limit", "alice", "tokens_per_day", "5000") == 0
    assert run(config_file, "users", "set-limit", "alice", "queries_per_day", "unlimited") == 0
    assert run(config_file, "users", "set-limit", "alice", "advanced_rag", "maybe") == 2
    assert run(config_file, "users", "set-limit", "alice", "tokens_per_day", "-3") == 2
    # A [[plans.NAME.limits]] entry, by its name (issue 21).
    assert run(config_file, "users", "set-limit", "alice", "limits.queries_per_hour", "7") == 0
    with pytest.raises(SystemExit) as exited:
        run(config_file, "users", "set-limit", "alice", "queries_per_fortnight", "7")
    assert exited.value.code == 2
    capsys.readouterr()

    assert run(config_file, "keys", "create", "alice", "--name", "laptop") == 0
    created = capsys.readouterr()
    secret = created.out.strip()
    assert secret.startswith("gwk_") and len(secret) > 40
    key_id = created.err.split()[2]
    assert key_id.startswith("key_")

    assert run(config_file, "users", "show", "alice") == 0
    shown = capsys.readouterr().out
    assert "plan:      pro" in shown
    assert "queries       0 / unlimited" in shown  # the override
    assert "tokens        0 / 5000" in shown
    assert "Asia/Ho_Chi_Minh" in shown
    assert key_id in shown and "laptop" in shown and secret not in shown

    assert run(config_file, "users", "clear-limit", "alice", "queries_per_day") == 0
    assert run(config_file, "users", "show", "alice") == 0
    assert "queries       0 / 1000" in capsys.readouterr().out

    assert run(config_file, "keys", "revoke", key_id) == 0
    assert "revoked" in capsys.readouterr().out
    assert run(config_file, "keys", "revoke", "key_nope") == 1
    assert run(config_file, "keys", "create", "nobody") == 1
    assert run(config_file, "keys", "create", "carol", "--create-user") == 0
    capsys.readouterr()

    assert run(config_file, "users", "list") == 0
    listing = capsys.readouterr().out
    assert listing.splitlines()[0].split()[:2] == ["USER", "PLAN"]
    assert "alice" in listing and "carol" in listing and "(2 of 2 users)" in listing
    assert run(config_file, "users", "list", "--plan", "pro") == 0
    assert "(1 of 1 users)" in capsys.readouterr().out

    assert run(config_file, "users", "show", "nobody") == 1


async def test_storage_errors_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[database]\nurl = "postgresql://nobody@127.0.0.1:1/none"\nconnect_timeout = 1.0\n'
    )
    returncode, _, stderr = await gateway("--config", str(path), "users", "list")
    assert returncode == 1
    assert stderr.startswith("gateway: error: PostgreSQL error") and "Traceback" not in stderr


def test_config_after_the_subcommand(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["users", "add", "dave", "--config", str(config_file)]) == 0
    assert main(["users", "list", "-c", str(config_file)]) == 0
    assert "dave" in capsys.readouterr().out
    # Given before the subcommand, it is not reset by the subcommand's default.
    assert main(["--config", str(config_file), "users", "show", "dave"]) == 0
    missing = tmp_path / "missing.toml"
    assert main(["users", "list", "--config", str(missing)]) == 2
    assert "missing.toml" in capsys.readouterr().err


async def test_uvicorn_runs_the_app_factory(config_file: Path) -> None:
    """The documented way to run it under uvicorn: the factory reads $GATEWAY_CONFIG."""
    import asyncio

    import httpx

    from tests.servers import free_port

    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "uvicorn",
        "gateway.app:create_app",
        "--factory",
        "--port",
        str(port),
        env={"GATEWAY_CONFIG": str(config_file), "PATH": "/usr/bin:/bin"},
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(30):
            # uvicorn binds its socket after the app's startup: wait for it to listen.
            while b"Uvicorn running on" not in (line := await process.stderr.readline()):
                assert line, "uvicorn exited"
        async with httpx.AsyncClient() as client:
            ready = await client.get(f"http://127.0.0.1:{port}/readyz")
        assert ready.json() == {"status": "ready"}
    finally:
        process.terminate()
        await process.wait()
