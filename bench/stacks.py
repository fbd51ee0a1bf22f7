"""Where a py-spy profile's samples went (``py-spy record --format raw``: collapsed
stacks, one a line, its count last).

    python -m bench.stacks PROFILE.txt [--top 15]

Prints the share of samples whose stack passes through each library or part of this
project (a sample counts once per group, so shares overlap: a statement executed by a
saga step is both ``nexus.saga`` and ``sqlalchemy``), and the functions most often on
top of the stack (their own time).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

GROUPS = {
    "sqlalchemy": r"sqlalchemy/",
    "asyncpg": r"asyncpg/",
    "psycopg (DBOS)": r"psycopg/",
    "dbos": r"dbos/",
    "aio_pika / aiormq / pamqp": r"aio_pika/|aiormq/|pamqp/",
    "pydantic": r"pydantic",
    "json": r"json/",
    "nexus.saga (engine)": r"nexus/saga/",
    "nexus.sagas (disk_create)": r"nexus/sagas/",
    "nexus.events (intake)": r"nexus/events.py",
    "outbox relay": r"schemas/outbox.py|nexus/saga/outbox.py",
    "asyncio event loop": r"asyncio/base_events.py:\d+\);[^;]*\(selectors",
    "socket send/recv": r"\.send |sock_sendall|_SelectorSocketTransport\.write|transports\.py",
    "threads (to_thread)": r"threading.py",
}


def summarise(path: Path, top: int) -> str:
    total = 0
    groups: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        for name, pattern in GROUPS.items():
            if re.search(pattern, stack):
                groups[name] += count
        leaves[stack.rsplit(";", 1)[-1]] += count
    lines = [f"{path}: {total} samples"]
    for name, count in groups.most_common():
        lines.append(f"  {100 * count / total:5.1f} %  {name}")
    lines.append("  on top of the stack:")
    for leaf, count in leaves.most_common(top):
        lines.append(f"  {100 * count / total:5.1f} %  {leaf}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profiles", type=Path, nargs="+")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    for profile in args.profiles:
        print(summarise(profile, args.top))


if __name__ == "__main__":
    main()
