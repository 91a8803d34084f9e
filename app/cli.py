"""The `tether` command: serve, db upgrade, openapi, reconcile."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from app.config import Settings
from app.services.status import StatusReport


class CLIError(Exception):
    """A problem the operator can fix; printed as one line, without a traceback."""


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _check(settings: Settings) -> StatusReport:
    from app.backends.dispatch import Dispatcher
    from app.backends.factory import build_backends
    from app.db.engine import Database
    from app.services.status import status

    async def go() -> StatusReport:
        try:
            db = Database(settings.database_url, pool_size=1)
        except Exception as error:
            raise CLIError(f"bad database URL {settings.database_url!r}: {_one_line(error)}") from None
        try:
            return await status(db, Dispatcher(1), build_backends(settings))
        finally:
            await db.dispose()

    return asyncio.run(go())


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.db.migrate import upgrade
    from app.supervisor import watch_workers_closely

    settings = Settings()
    if settings.is_sqlite:
        if args.workers > 1:
            raise CLIError("SQLite is single-process; use PostgreSQL (TETHER_DATABASE_URL) for --workers > 1")
        upgrade(settings.database_url)
    if args.workers > 1 and not settings.distributed_locks:
        raise CLIError(
            "TETHER_DISTRIBUTED_LOCKS=false leaves --workers > 1 free to work on one volume at once; "
            "turn it on or serve with one worker"
        )
    report = _check(settings)
    if not report.healthy:
        raise CLIError(f"not starting: database {report.database}; backend {report.backend}")
    if args.workers > 1:
        watch_workers_closely()
    uvicorn.run(
        "app.main:create_app",
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

    settings = Settings()
    try:
        upgrade(settings.database_url)
    except Exception as error:
        raise CLIError(f"cannot upgrade {settings.database_url!r}: {_one_line(error)}") from None
    print("database is at the latest revision")
    return 0


def _status(_args: argparse.Namespace) -> int:
    settings = Settings()
    report = _check(settings)
    print(f"database: {report.database}")
    print(f"backend:  {report.backend} ({settings.volume_backend} volumes, {settings.target} target)")
    for title, counts in (("volumes", report.volumes), ("attachments", report.attachments)):
        listed = ", ".join(f"{status} {count}" for status, count in sorted(counts.items())) or "none"
        print(f"{title}: {listed}")
    return 0 if report.healthy else 1


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
    from app.backends.factory import build_backends
    from app.db.engine import Database
    from app.db.locks import cross_process_locks
    from app.secrets import SecretBox
    from app.services.reconcile import Reconciler

    settings = Settings()
    if "fake" in (settings.volume_backend, settings.target):
        # the fake backend keeps its volumes and targets in the server's memory: there is nothing here to
        # compare, and "restoring" exports from this empty copy would only report work that was never needed
        print(
            "tether: the fake backend lives in the server's memory, which `tether reconcile` cannot see; "
            "nothing was changed (the server reconciles its own at start-up)",
            file=sys.stderr,
        )
        return 1

    async def go() -> int:
        db = Database(settings.database_url)
        # the servers sharing this database may be running: take each volume's lock as they do
        locks = cross_process_locks(db, settings.distributed_locks)
        dispatcher = Dispatcher(settings.backend_workers, locks, settings.lock_timeout)
        try:
            report = await Reconciler(db, dispatcher, build_backends(settings), SecretBox(settings.secret_key)).run()
        finally:
            if locks is not None:
                await locks.close()
            await db.dispose()
        for name, value in vars(report).items():
            print(f"{name}: {len(value)}" + (f" {value}" if value else ""))
        return 1 if report.errors else 0

    return asyncio.run(go())


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
        help="is the database reachable, is the backend reachable, counts by status",
        description="Report whether the database and the storage backend answer, and count volumes and "
        "attachments by status; exit 1 when either is down.",
        formatter_class=shown,
    ).set_defaults(func=_status)

    commands.add_parser(
        "reconcile",
        help="finish interrupted work and make the target's exports and ACLs match the database",
        description="Finish or roll back interrupted work and make the target's exports and ACLs match the "
        "database; exit 1 when something could not be fixed.",
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
