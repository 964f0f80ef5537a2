"""A/B: two versions of the proxy under bench/e2e.py's load, in alternation.

    python bench/ab.py A B [--clients 8] [--batch 16] [--seconds 5] [--rounds 4]
                          [--workers process|inline]

A and B: git revisions of this repository (each checked out into a worktree of
its own for the run, removed after it) or folders that hold a tree of the
proxy's code. One stand-in serves every round; a round starts a new proxy from
A, runs the batch load of bench/e2e.py against it (after its warm-up), stops it,
and does the same with B, each on a new data folder. Printed per round and
version (A first in odd rounds, B first in even ones, after a warm-up of the
stand-in): jobs/s, and the proxy's CPU per job (its loop, SQLite threads and
worker process together) over the stand-in's CPU per job in the same load; then
the median of each, and B's over A's.

Why that second figure: these machines' speed swings by a fifth or more from
one minute to the next (bench/HISTORY.md), and with it every process's CPU per
job and every rate, so two versions measured minutes apart differ by more than
most changes do. The stand-in's code is the same for both, and its CPU per job
swings with the machine as the proxy's does: the proxy's over the stand-in's
keeps the change and cancels most of the minute. It says what a change does to
the proxy's own work per job; jobs/s, what that does end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from common import CpuMeter, StandInProcess, add_workers_option, start_proxy
from e2e import batch_load

REPOSITORY = Path(__file__).resolve().parent.parent
PROXY_PARTS = ("proxy loop", "proxy SQLite threads", "worker process")


@dataclass
class Round:
    rate: float  # jobs/s
    cpu: float  # the proxy's CPU per job over the stand-in's


def code_of(version: str, tree: Path, stack: ExitStack) -> Path:
    """The folder of `version`'s code: itself if it is one, else a worktree of the
    revision made at `tree`, removed when `stack` closes."""
    if (Path(version) / "proxy" / "__init__.py").is_file():
        return Path(version).resolve()
    git = ["git", "-C", str(REPOSITORY), "worktree"]
    subprocess.run([*git, "add", "--detach", "--quiet", str(tree), version], check=True)
    stack.callback(subprocess.run, [*git, "remove", "--force", str(tree)], check=True)
    return tree


async def measure(
    code: Path, standin: StandInProcess, folder: Path, args: argparse.Namespace
) -> Round:
    """One round of one version: a new proxy from `code` on `folder`, under the load."""
    proxy = start_proxy(standin.url, folder, args.workers, code=code)
    try:
        meter = CpuMeter(proxy, standin)
        jobs, _, seconds, _ = await batch_load(
            proxy.url, args.clients, args.batch, args.seconds, meter.start
        )
        used = meter.used()
    finally:
        proxy.stop()
    proxy_cpu = sum(used[part] for part in PROXY_PARTS)
    return Round(jobs / seconds, proxy_cpu / used["stand-in"])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", metavar="A", help="a git revision, or a folder of the code")
    parser.add_argument("b", metavar="B", help="the same, for the other version")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=4)
    add_workers_option(parser)
    args = parser.parse_args()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=Path.cwd())))
        # (labelled A and B: the same version twice shows the noise alone)
        versions = {
            f"{label} ({version})": code_of(version, tmp / f"code-{label}", stack)
            for label, version in (("A", args.a), ("B", args.b))
        }
        standin = StandInProcess.start("--no-auth", "--workers", "4", "--queue-size", "4096")
        stack.callback(standin.stop)
        print(
            f"A/B end to end: {args.clients} clients x batches of {args.batch}, "
            f"{args.seconds:g} s a round, jobs.workers = {args.workers}; "
            "CPU: the proxy's per job over the stand-in's"
        )
        # The stand-in's first seconds under load cost it more CPU per job than the
        # rest (it warms up): they would flatter whichever version came first.
        await batch_load(standin.url, args.clients, args.batch, args.seconds, lambda: None)
        measured: dict[str, list[Round]] = {name: [] for name in versions}
        for number in range(1, args.rounds + 1):
            # A B, B A, ...: neither version always follows the other
            order = list(versions.items())[:: 1 if number % 2 else -1]
            line: list[str] = []
            for name, code in order:
                folder = tmp / f"{number}-{name[0]}"
                folder.mkdir()
                one = await measure(code, standin, folder, args)
                measured[name].append(one)
                line.append(f"{name} {one.rate:.0f} jobs/s, CPU {one.cpu:.2f}")
            print(f"  round {number}: " + "; ".join(line))
        medians = {
            name: (
                statistics.median(r.rate for r in rounds),
                statistics.median(r.cpu for r in rounds),
            )
            for name, rounds in measured.items()
        }
        for name, (rate, cpu) in medians.items():
            print(f"{name}: median {rate:.0f} jobs/s, CPU {cpu:.2f}")
        (rate_a, cpu_a), (rate_b, cpu_b) = medians.values()
        print(f"B/A: jobs/s {rate_b / rate_a:.2f}, CPU per job {cpu_b / cpu_a:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
