"""A stand-in for `tether node` for the harness's own tests: logs what the real one logs when ready, records the
environment it got, proves it reaches the database from where it runs, and exits 0 on SIGTERM.

STUB_READY_STARTS=1: say ready only on the first start in its directory (a node that comes back broken).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType


def _stop(_signum: int, _frame: FrameType | None) -> None:
    print(json.dumps({"level": "INFO", "logger": "tether.node", "message": "stub stopping"}), flush=True)
    sys.exit(0)


async def _database_answers(url: str) -> int:
    import asyncpg

    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"), timeout=10)
    try:
        return int(await connection.fetchval("SELECT 42"))
    finally:
        await connection.close()


def main() -> None:
    signal.signal(signal.SIGTERM, _stop)
    name = os.environ["TETHER_NODE_NAME"]
    starts_file = Path("stub-starts")
    starts = int(starts_file.read_text()) + 1 if starts_file.exists() else 1
    starts_file.write_text(str(starts))
    tether = {key: value for key, value in os.environ.items() if key.startswith("TETHER_")}
    Path(f"stub-env-{starts}.json").write_text(json.dumps(tether))
    answer = asyncio.run(_database_answers(os.environ["TETHER_DATABASE_URL"]))
    Path(f"stub-db-{starts}").write_text(str(answer))
    limit = os.environ.get("STUB_READY_STARTS")
    if limit is None or starts <= int(limit):
        print(json.dumps({"level": "INFO", "logger": "tether.node", "message": f"node {name} ready"}), flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
