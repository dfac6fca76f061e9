"""Shared by the benchmarks: machine description and section-wise updates of BENCHMARKS.md.

Each benchmark owns one section of BENCHMARKS.md, delimited by HTML comments, and rewrites only that
section, so benchmarks can be rerun independently without clobbering each other's results.
"""

import datetime
import os
import platform
import re
import shlex
import sys
from pathlib import Path

import torch

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEvery section is written by the script it names; rerun that script to refresh it.\n"


def machine() -> str:
    """One line describing where the numbers were taken."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU cores ({cpu}), {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.system()} {platform.release()}")


def machines(records: list[dict], unrecorded: str) -> str:
    """Where a benchmark's recorded rows ran: each row records its `machine` (rows from before 2026-12-02 did
    not; `unrecorded` says where those ran). The machine changes between sessions, and with it float rounding."""
    counts: dict[str, int] = {}
    for r in records:
        name = r.get("machine", f"machine not recorded ({unrecorded})")
        counts[name] = counts.get(name, 0) + 1
    return "; ".join(f"{c} row{'s' if c > 1 else ''}: {m}" for m, c in sorted(counts.items(), key=lambda mc: -mc[1]))


def invocation() -> str:
    """The command that is running, as one would type it in the repository root (arguments shell-quoted)."""
    return shlex.join([".venv/bin/python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def today() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section `name` of BENCHMARKS.md with `body` (markdown)."""
    start, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
