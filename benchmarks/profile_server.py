"""Where a running server's CPU goes: py-spy samples its main thread while the attach cycle loads it.

Records `--seconds` of samples from the server process `--pid` (root, or ptrace allowed) while a separate
attach-cycle driver runs at `--clients`, then prints the share of samples by library (the leaf frame's
package: sqlalchemy, fastapi, asyncpg, …) and the hottest functions. SQLAlchemy's async layer runs
statements in greenlets, which py-spy shows as stacks of their own, so the leaf frame is what counts.

    python -m benchmarks.profile_server --pid $(pgrep -f 'tether serve' | head -1) --base http://127.0.0.1:18776
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*):\d+\)$")


def library(path: str) -> str:
    parts = path.split("/")
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1]
    if path.startswith("app/") or "/app/" in path:
        return "tether (app/)"
    if "/lib/python3" in path:
        return "python stdlib: " + parts[-1].removesuffix(".py")
    return parts[0] if len(parts) > 1 else path


def summarise(raw: Path, top: int) -> str:
    by_library: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not count.isdigit() or "MainThread" not in frames[0]:
            continue  # another thread, or the tail of a frame name that holds a newline
        samples = int(count)
        total += samples
        match = _FRAME.match(frames[-1])
        if match is None:  # only the thread's name: the event loop's native code (uvloop)
            by_library["event loop (native)"] += samples
            continue
        by_library[library(match["file"])] += samples
        by_function[f"{match['function']} ({match['file']})"] += samples
    lines = [f"{total} samples of the main thread", "", "| library (leaf frame) | share |", "|---|---|"]
    lines += [f"| {name} | {100 * n / total:.1f}% |" for name, n in by_library.most_common(12)]
    lines += ["", "hottest functions (self):"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in by_function.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--base", default="http://127.0.0.1:18776")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    raw = Path(tempfile.mkdtemp(prefix="tether-profile-")) / "samples.txt"
    drive = [sys.executable, "-m", "benchmarks.attach_cycle", "--base", args.base, "--clients", str(args.clients)]
    drive += ["--seconds", str(args.seconds + 4), "--warmup", "1", "--server-pid", str(args.pid)]
    record = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(args.pid), "--threads"]
    record += ["--duration", str(args.seconds), "--rate", "250", "--format", "raw", "--nonblocking"]
    record += ["--output", str(raw)]
    driver = subprocess.Popen(drive, stdout=subprocess.PIPE)
    try:
        subprocess.run(record, check=True, capture_output=True)
    finally:
        out, _ = driver.communicate()
    print(out.decode().strip())
    print(summarise(raw, args.top))


if __name__ == "__main__":
    main()
