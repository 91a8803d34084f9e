"""The `tether` command: serve, node, db upgrade, openapi, status, reconcile."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import Settings
from app.services.status import StatusReport

if TYPE_CHECKING:
    from app.db.locks import AdvisoryLocks, FileLocks
    from app.services.nodes import Nodes


class CLIError(Exception):
    """A problem the operator can fix; printed as one line, without a traceback."""


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _settings() -> Settings:
    settings = Settings()
    if settings.nodes == "remote" and settings.is_sqlite:
        raise CLIError("TETHER_NODES=remote needs PostgreSQL: set TETHER_DATABASE_URL=postgresql+asyncpg://...")
    return settings


def _check(settings: Settings) -> StatusReport:
    from app.backends.dispatch import Dispatcher
    from app.db.engine import Database
    from app.node import local_storage
    from app.secrets import SecretBox
    from app.services.status import status

    async def go() -> StatusReport:
        try:
            db = Database(settings.database_url, pool_size=1)
        except Exception as error:
            raise CLIError(f"bad database URL {settings.database_url!r}: {_one_line(error)}") from None
        try:
            node = None
            if settings.nodes == "embedded":
                node = local_storage(settings, db, Dispatcher(1), SecretBox(settings.secret_key)).node
            return await status(db, node)
        finally:
            await db.dispose()

    return asyncio.run(go())


def _locks(settings: Settings, *, one_host: bool) -> AdvisoryLocks | FileLocks | None:
    """The volumes' locks this command takes (app/db/locks.py), as the server's are."""
    from app.db.locks import cross_process_locks

    return cross_process_locks(
        settings.database_url, settings.distributed_locks, one_host=one_host, lock_path=settings.lock_path
    )


def _can_lock(settings: Settings) -> None:
    """Embedded mode's lock file opens, or one line that says where to put it."""
    from app.db.locks import FileLocks

    locks = _locks(settings, one_host=settings.nodes == "embedded")
    if not isinstance(locks, FileLocks):
        return
    try:
        locks.open()
    except OSError as error:
        raise CLIError(
            f"cannot open the volumes' lock file {locks.path}: {error.strerror or error}; "
            "set TETHER_LOCK_PATH to a directory every Tether process of this host can write"
        ) from None
    finally:
        asyncio.run(locks.close())


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.db.migrate import upgrade
    from app.supervisor import watch_workers_closely

    settings = _settings()
    if settings.is_sqlite:
        if args.workers > 1:
            raise CLIError("SQLite is single-process; use PostgreSQL (TETHER_DATABASE_URL) for --workers > 1")
        upgrade(settings.database_url)
    if args.workers > 1 and not settings.distributed_locks:
        raise CLIError(
            "TETHER_DISTRIBUTED_LOCKS=false leaves --workers > 1 free to work on one volume at once; "
            "turn it on or serve with one worker"
        )
    _can_lock(settings)
    report = _check(settings)
    if not report.healthy:
        raise CLIError(f"not starting: database {report.database}; backend {report.backend}")
    if args.workers > 1:
        watch_workers_closely()
    uvicorn.run(
        "app.main:server_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=settings.log_level.lower(),
        access_log=False,
        # a busy 2-core host can miss uvicorn's 5 s worker ping; a restarted worker drops its requests (a dead
        # worker is still noticed at once: app/supervisor.py)
        timeout_worker_healthcheck=60,
    )
    return 0


def _db_upgrade(_args: argparse.Namespace) -> int:
    from app.db.migrate import upgrade

    settings = _settings()
    try:
        upgrade(settings.database_url)
    except Exception as error:
        raise CLIError(f"cannot upgrade {settings.database_url!r}: {_one_line(error)}") from None
    print("database is at the latest revision")
    return 0


def _status(_args: argparse.Namespace) -> int:
    settings = _settings()
    report = _check(settings)
    print(f"database: {report.database}")
    if settings.nodes == "embedded":
        print(f"backend:  {report.backend} ({settings.volume_backend} volumes, {settings.target} target)")
    for title, counts in (("volumes", report.volumes), ("attachments", report.attachments)):
        listed = ", ".join(f"{status} {count}" for status, count in sorted(counts.items())) or "none"
        print(f"{title}: {listed}")
    nodes = _nodes(settings) if report.database == "ok" else []
    print(f"nodes ({settings.nodes}): {len(nodes)}" + ("" if nodes else " registered"))
    for node in nodes:
        capacity = ""
        if node.total_bytes is not None and node.free_bytes is not None:
            capacity = f", {node.free_bytes / 1024**3:.1f} of {node.total_bytes / 1024**3:.1f} GiB free"
        queued = f", {node.queue_depth} job(s) queued" if node.queue_depth is not None else ""
        state = "up" if node.up else "DOWN"
        print(
            f"  {node.name}: {state}, host {node.host}, zone {node.zone}, "
            f"heartbeat {node.heartbeat_age:.0f} s ago{capacity}{queued}"
        )
    down = [node.name for node in nodes if not node.up]
    return 0 if report.healthy and not down else 1


def _nodes(settings: Settings) -> list[Any]:
    from app.backends.dispatch import Dispatcher
    from app.db.engine import Database
    from app.node import local_storage
    from app.queue import JobQueue
    from app.secrets import SecretBox
    from app.services.nodes import Nodes
    from app.services.status import node_report

    async def go() -> list[Any]:
        db = Database(settings.database_url, pool_size=1)
        secrets = SecretBox(settings.secret_key)
        try:
            if settings.nodes == "remote":  # an unstarted queue: it only says that jobs are counted
                nodes = Nodes(
                    db,
                    Dispatcher(1),
                    queue=JobQueue(settings.database_url, secrets),
                    down_time=settings.service_down_time,
                )
            else:
                nodes = local_storage(settings, db, Dispatcher(1), secrets).nodes
            return await node_report(nodes)
        finally:
            await db.dispose()

    return asyncio.run(go())


def _node(_args: argparse.Namespace) -> int:
    import signal

    import uvloop
    from sqlalchemy.exc import SQLAlchemyError

    from app.backends.base import BackendError
    from app.errors import TetherError
    from app.logs import configure_logging
    from app.node import NodeAgent

    settings = _settings()
    if settings.is_sqlite:
        raise CLIError("tether node needs PostgreSQL (TETHER_DATABASE_URL=postgresql+asyncpg://...)")
    if settings.nodes != "remote":
        raise CLIError("tether node is the storage agent of TETHER_NODES=remote; set it (and run the API with it)")
    configure_logging(settings.log_level, json_lines=settings.log_json)
    agent = NodeAgent(settings)

    async def go() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stopping.set)
        await agent.run()

    try:
        uvloop.run(go())  # the loop uvicorn serves the API on; ~9% less of the node's CPU per job than asyncio's
    except (OSError, BackendError, SQLAlchemyError, TetherError) as error:  # its database or storage is down
        raise CLIError(f"node {settings.node_name} cannot start: {_one_line(error)}") from None
    return 0


def _openapi(args: argparse.Namespace) -> int:
    from app.main import create_app

    spec = create_app(Settings()).openapi()
    target = Path(args.output)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(spec, indent=2, sort_keys=False) + "\n")
    print(f"wrote {target}")
    return 0


def _reconcile(_args: argparse.Namespace) -> int:
    from app.backends.dispatch import Dispatcher
    from app.db.engine import Database
    from app.node import local_storage
    from app.secrets import SecretBox

    settings = _settings()
    if settings.nodes == "remote":
        return _reconcile_remote(settings)
    if "fake" in (settings.volume_backend, settings.target):
        # the fake backend keeps its volumes and targets in the server's memory: there is nothing here to
        # compare, and "restoring" exports from this empty copy would only report work that was never needed
        print(
            "tether: the fake backend lives in the server's memory, which `tether reconcile` cannot see; "
            "nothing was changed (the server reconciles its own at start-up)",
            file=sys.stderr,
        )
        return 1

    _can_lock(settings)

    async def go() -> int:
        db = Database(settings.database_url)
        # the servers sharing this database may be running: take each volume's lock as they do
        locks = _locks(settings, one_host=True)
        dispatcher = Dispatcher(settings.backend_workers, locks, settings.lock_timeout)
        try:
            report = await local_storage(settings, db, dispatcher, SecretBox(settings.secret_key)).reconciler.run()
        finally:
            if locks is not None:
                await locks.close()
            await db.dispose()
        for name, value in vars(report).items():
            print(f"{name}: {len(value)}" + (f" {value}" if value else ""))
        return 1 if report.errors else 0

    return asyncio.run(go())


def _reconcile_remote(settings: Settings) -> int:
    """A reconcile job for every up node, and their reports; this process builds no backend."""
    from app.backends.dispatch import Dispatcher
    from app.db.engine import Database
    from app.queue import JobQueue
    from app.secrets import SecretBox
    from app.services.nodes import Nodes

    async def go() -> int:
        db = Database(settings.database_url)
        queue = JobQueue(settings.database_url, SecretBox(settings.secret_key))
        await queue.start()
        nodes = Nodes(
            db, Dispatcher(1), queue=queue, timeout=settings.node_timeout, down_time=settings.service_down_time
        )
        try:
            return await reconcile_nodes(nodes)
        finally:
            await queue.close()
            await db.dispose()

    return asyncio.run(go())


async def reconcile_nodes(nodes: Nodes) -> int:
    """Each registered node in turn: its reconcile job's report, or why not; 1 when one is down or failed.

    Whether a node is up is read again right before its turn: a reconcile before it may take long (one that waits
    for busy volumes), and a heartbeat read at the start would by then be older than the down time."""
    from app.backends.base import BackendError
    from app.errors import ServiceUnavailable

    failed = 0
    names = sorted(await nodes.services(fresh=True))
    if not names:
        print("no storage node is registered", file=sys.stderr)
    for name in names:
        service = (await nodes.services(fresh=True)).get(name)
        if service is None or not nodes.is_up(service):
            print(f"node {name}: down, not reconciled")
            failed += 1
            continue
        try:
            report = await (await nodes.node_named(name)).reconcile()
        except (BackendError, ServiceUnavailable) as error:
            print(f"node {name}: reconcile failed: {error}")
            failed += 1
            continue
        print(f"node {name}:")
        for key, value in report.items():
            print(f"  {key}: {len(value)}" + (f" {value}" if value else ""))
        failed += bool(report.get("errors"))
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    # every option's help ends with its default; settings come from TETHER_* variables (README, docs/operations.md)
    shown = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="tether",
        description="Tether: OpenStack Block Storage v3 volumes and attachments.",
        epilog="Configuration is read from TETHER_* environment variables or ./.env (see docs/operations.md).",
        formatter_class=shown,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the API server (upgrades an embedded SQLite database first)",
        description="Run the API server. On SQLite the database is upgraded first; on PostgreSQL run "
        "`tether db upgrade` before.",
        formatter_class=shown,
    )
    serve.add_argument(
        "--host", default="127.0.0.1", metavar="ADDRESS", help="address to listen on (0.0.0.0: every interface)"
    )
    serve.add_argument(
        "--port", type=int, default=8776, metavar="PORT", help="TCP port to listen on (the one Cinder uses)"
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="server processes; more than 1 needs PostgreSQL (TETHER_DATABASE_URL)",
    )
    serve.set_defaults(func=_serve)

    db = commands.add_parser(
        "db", help="database maintenance", description="Database maintenance.", formatter_class=shown
    )
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    db_commands.add_parser(
        "upgrade",
        help="apply every migration",
        description="Apply every migration to TETHER_DATABASE_URL.",
        formatter_class=shown,
    ).set_defaults(func=_db_upgrade)

    openapi = commands.add_parser(
        "openapi",
        help="write the OpenAPI spec",
        description="Write the OpenAPI spec of the API this version serves.",
        formatter_class=shown,
    )
    openapi.add_argument(
        "--output", default="openapi/openapi.json", metavar="FILE", help="where to write it, from the working directory"
    )
    openapi.set_defaults(func=_openapi)

    commands.add_parser(
        "status",
        help="is the database reachable, is the backend reachable, counts by status, every node's state",
        description="Report whether the database and the storage backend answer, count volumes and "
        "attachments by status and list every storage node (up or down, heartbeat age, capacity, queued "
        "jobs); exit 1 when either is down or a node is down.",
        formatter_class=shown,
    ).set_defaults(func=_status)

    node = commands.add_parser(
        "node",
        help="run a storage node agent (TETHER_NODES=remote, PostgreSQL)",
        description="Run this host's storage node: register it (TETHER_NODE_NAME), heartbeat its pool's "
        "capacity every TETHER_NODE_HEARTBEAT s, run its queue's jobs (volume create and delete, export, "
        "CHAP and ACLs on its target) and reconcile its own volumes at start and every "
        "TETHER_RECONCILE_INTERVAL s. It takes the storage settings (TETHER_VOLUME_BACKEND, TETHER_TARGET, "
        "TETHER_FILE_DIR, TETHER_LVM_*, TETHER_TGT_CONTROL_PORT), TETHER_AVAILABILITY_ZONE and "
        "TETHER_TARGET_PORTAL; stops on SIGTERM or SIGINT.",
        formatter_class=shown,
    )
    node.set_defaults(func=_node)

    commands.add_parser(
        "reconcile",
        help="finish interrupted work and make the target's exports and ACLs match the database",
        description="Finish or roll back interrupted work and make the target's exports and ACLs match the "
        "database; with TETHER_NODES=remote, every up node reconciles its own (a job each) and its report is "
        "printed. Exit 1 when something could not be fixed.",
        formatter_class=shown,
    ).set_defaults(func=_reconcile)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CLIError as error:
        print(f"tether: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # settings that do not validate
        print(f"tether: invalid configuration: {_one_line(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
