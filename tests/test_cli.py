"""The `tether` command as an operator meets it: help everywhere, one-line errors, status."""

import argparse
import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app.backends.dispatch import Dispatcher
from app.cli import build_parser, reconcile_nodes
from app.db.engine import Database
from app.queue import JobQueue
from app.secrets import SecretBox
from app.services.nodes import Nodes, RemoteNode, node_row

TETHER = str(Path(sys.executable).parent / "tether")


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    return subprocess.run(
        [TETHER, *args], capture_output=True, text=True, env={**base, **(env or {})}, cwd=cwd, timeout=60
    )


@pytest.mark.parametrize(
    "command", [[], ["serve"], ["node"], ["db"], ["db", "upgrade"], ["openapi"], ["status"], ["reconcile"]]
)
def test_every_command_has_help(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0
    assert "usage: tether" in result.stdout


def test_status_on_a_fresh_sqlite_database(tmp_path: Path) -> None:
    env = {"TETHER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/t.db"}
    assert run("db", "upgrade", env=env).returncode == 0
    result = run("status", env=env)
    assert result.returncode == 0, result.stderr
    assert "database: ok" in result.stdout
    assert "backend:  ok (fake volumes, fake target)" in result.stdout
    assert "volumes: none" in result.stdout


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TETHER_DATABASE_URL": "bogus://nowhere"}, "tether: bad database URL 'bogus://nowhere'"),
        ({"TETHER_TARGET": "nope"}, "tether: invalid configuration"),
    ],
)
def test_bad_configuration_is_one_line(env: dict[str, str], expected: str) -> None:
    result = run("status", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith(expected)
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unreachable_database_and_target_are_reported_not_raised(tmp_path: Path) -> None:
    env = {
        "TETHER_DATABASE_URL": "postgresql+asyncpg://nobody@127.0.0.1:1/none",
        "TETHER_TARGET": "tgt",
        "TETHER_TGT_CONTROL_PORT": "4099",
    }
    result = run("status", env=env)
    assert result.returncode == 1
    assert "database: unreachable" in result.stdout
    assert "backend:  unreachable" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_serve_refuses_to_start_against_an_unreachable_target(tmp_path: Path) -> None:
    env = {
        "TETHER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/t.db",
        "TETHER_TARGET": "tgt",
        "TETHER_TGT_CONTROL_PORT": "4099",
    }
    result = run("serve", "--port", "1", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("tether: not starting: database ok; backend unreachable")
    assert "Traceback" not in result.stderr


def test_sqlite_refuses_several_workers(tmp_path: Path) -> None:
    result = run("serve", "--workers", "2", env={"TETHER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/t.db"})
    assert result.returncode == 1
    assert "SQLite is single-process" in result.stderr


def test_serve_help_shows_every_option_with_its_default() -> None:
    result = run("serve", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "--host ADDRESS address to listen on" in text
    assert "(default: 127.0.0.1)" in text
    assert "(default: 8776)" in text
    assert "(default: 1)" in text


def test_openapi_help_shows_its_default() -> None:
    text = " ".join(run("openapi", "--help").stdout.split())
    assert "(default: openapi/openapi.json)" in text


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_every_option_and_command_has_help_text() -> None:
    for parser in _parsers(build_parser()):
        assert parser.description, parser.prog
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert all(choice.help for choice in action._choices_actions), parser.prog
            else:
                assert action.help, (parser.prog, action.option_strings)
                assert action.help != argparse.SUPPRESS, (parser.prog, action.option_strings)


def test_several_workers_refuse_to_start_without_cross_process_locks() -> None:
    env = {"TETHER_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:1/none", "TETHER_DISTRIBUTED_LOCKS": "false"}
    result = run("serve", "--workers", "2", env=env)
    assert result.returncode == 1
    assert "TETHER_DISTRIBUTED_LOCKS=false" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["serve", "reconcile"])
def test_a_lock_path_nobody_can_write_refuses_to_start_with_one_line(tmp_path: Path, command: str) -> None:
    """Embedded mode's per-volume locks are a file of this host (TETHER_LOCK_PATH): one that cannot be opened is
    said before anything starts, not a 500 at the first request that takes a lock."""
    (tmp_path / "a-file").write_text("")
    env = {
        "TETHER_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:1/none",
        "TETHER_LOCK_PATH": str(tmp_path / "a-file"),  # a file, not a directory: not even root can make it one
        "TETHER_VOLUME_BACKEND": "file",
        "TETHER_TARGET": "tgt",
        "TETHER_FILE_DIR": str(tmp_path / "volumes"),
    }
    result = run(command, env=env)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"tether: cannot open the volumes' lock file {tmp_path / 'a-file' / 'volumes.lock'}: ")
    assert line.endswith("set TETHER_LOCK_PATH to a directory every Tether process of this host can write")


def test_reconcile_on_the_fake_backend_says_it_cannot_see_the_server(tmp_path: Path) -> None:
    result = run("reconcile", env={"TETHER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/t.db"})
    assert result.returncode == 1
    assert "cannot see" in result.stderr
    assert "nothing was changed" in result.stderr
    assert "exports_restored" not in result.stdout


@pytest.mark.parametrize("command", [["serve"], ["node"], ["status"], ["reconcile"]])
def test_remote_nodes_on_sqlite_refuse_to_start_with_one_line(tmp_path: Path, command: list[str]) -> None:
    env = {"TETHER_NODES": "remote", "TETHER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/t.db"}
    result = run(*command, env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "tether: TETHER_NODES=remote needs PostgreSQL: set TETHER_DATABASE_URL=postgresql+asyncpg://..."
    ]
    assert not (tmp_path / "t.db").exists()  # refused before anything was made


def test_node_needs_remote_mode(tmp_path: Path) -> None:
    env = {"TETHER_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:1/none"}
    result = run("node", env=env)
    assert result.returncode == 1
    assert "TETHER_NODES=remote" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_status_lists_the_embedded_node(tmp_path: Path) -> None:
    env = {"TETHER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/t.db", "TETHER_NODE_NAME": "n1"}
    assert run("db", "upgrade", env=env).returncode == 0
    result = run("status", env=env)
    assert result.returncode == 0, result.stderr
    # no server has run yet: nothing registered (a running server's node appears with its heartbeat)
    assert "nodes (embedded): 0 registered" in result.stdout


@pytest.mark.postgres
async def test_remote_reconcile_judges_each_node_by_its_heartbeat_at_its_turn(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tether reconcile` in remote mode, node after node: a first node's reconcile that takes longer than the
    down time must not make the next one look down. It did (the heartbeats were read once, at the start): the
    torture across nodes saw `node node-b: down, not reconciled` with node-b beating every second."""
    db = Database(postgres_url)
    nodes = Nodes(db, Dispatcher(1), queue=JobQueue(postgres_url, SecretBox(None)), down_time=1.0)
    names = [f"cli-{uuid.uuid4().hex[:8]}-{n}" for n in "ab"]

    async def beat(name: str) -> None:
        await nodes.heartbeat(node_row(SimpleNamespace(**ROW, node_name=name), None))

    async def slow_reconcile(node: RemoteNode) -> dict[str, list[str]]:  # the first node's takes 2.5 down times
        if node.name == names[0]:
            await asyncio.sleep(2.5)
        return {"errors": []}

    async def second_beats() -> None:
        while True:
            await beat(names[1])
            await asyncio.sleep(0.2)

    monkeypatch.setattr(RemoteNode, "reconcile", slow_reconcile)
    monkeypatch.setattr(nodes, "services", only_these(nodes.services, names))
    await beat(names[0])
    beating = asyncio.create_task(second_beats())
    try:
        await asyncio.sleep(0.1)
        assert await reconcile_nodes(nodes) == 0
    finally:
        beating.cancel()
        await db.dispose()
    out = capsys.readouterr().out
    assert f"node {names[1]}:\n  errors: 0" in out, out
    assert "down" not in out, out


ROW = {
    "backend_name": "default",
    "pool_name": "default",
    "availability_zone": "nova",
    "target_portal": "127.0.0.1:3260",
    "volume_backend": "fake",
    "target": "fake",
    "lvm_type": "thick",
}


def only_these(services: Any, names: list[str]) -> Any:
    """nodes.services, restricted to this test's nodes (the session's database has other tests' rows)."""

    async def read(*, fresh: bool = False) -> dict[str, Any]:
        return {name: row for name, row in (await services(fresh=fresh)).items() if name in names}

    return read
