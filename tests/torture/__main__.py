"""python -m tests.torture [--long] [--seed N]: run, print the figures, exit 1 on a problem."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from tests.torture import Settings, judge, report, torture


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.torture", description=__doc__)
    parser.add_argument("--long", action="store_true", help="60 kills instead of 10")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    settings = Settings.long(args.seed) if args.long else Settings.short(args.seed)
    print(f"torture: {settings}", flush=True)
    with tempfile.TemporaryDirectory(prefix="torture-") as folder:
        run = asyncio.run(torture(settings, Path(folder), say=lambda s: print(s, flush=True)))
    verdict = judge(run)
    print(report(verdict), flush=True)
    return 1 if verdict.problems else 0


if __name__ == "__main__":
    sys.exit(main())
