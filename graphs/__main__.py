"""``python -m graphs``: regenerate every ``graphs/<configuration>.txt``; ``--check`` only
compares and prints a diff (exit 1 if any record is stale)."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from .record import CONFIGURATIONS, record

FOLDER = Path(__file__).parent


def stale(name: str) -> str:
    """A unified diff from the checked-in record to a fresh one; empty when they agree."""
    path = FOLDER / f"{name}.txt"
    old = path.read_text().splitlines(keepends=True) if path.exists() else []
    new = (record(name) + "\n").splitlines(keepends=True)
    return "".join(difflib.unified_diff(old, new, f"graphs/{name}.txt (checked in)", f"graphs/{name}.txt (now)"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graphs", description=__doc__)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("names", nargs="*", default=CONFIGURATIONS)
    arguments = parser.parse_args(argv)
    failed = False
    for name in arguments.names:
        if arguments.check:
            diff = stale(name)
            failed |= bool(diff)
            sys.stdout.write(diff)
        else:
            (FOLDER / f"{name}.txt").write_text(record(name) + "\n")
            print(f"wrote graphs/{name}.txt")
    if arguments.check and not failed:
        print(f"graphs/: {len(arguments.names)} records match")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
