"""What the run proves: the checks on every attempt, and the figures to print.

For every 202 the clients received:
    the job led to its real result (201/202, or 409 when its write ran before),
    or its result was taken by a fetch whose answer the client never got;
    its write ran at least once (the stand-in's count for its key);
    a `store` job whose life (sent .. result fetched) overlapped no fault that can
    repeat a write ran exactly once;
    a result fetched before a kill did not run again after it.
For everything else: a refused attempt never ran, and no write ran whose key no
client sent. Every write that ran twice is traced to the faults that overlapped
its job's life; one that overlapped none is a failure. The cause printed for a
repeat is the last such fault between the two runs (the stand-in notes when
each write ran, on the machine's one monotonic clock).
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter
from dataclasses import dataclass, field

from tests.torture.harness import Run
from tests.torture.load import COLLECTION, Attempt

# faults that can make a write run twice, and why
REPEATS = {
    "kill": "proxy killed while the job was at the stand-in: sent but its id not yet"
    " recorded, or its result fetched but not yet stored",
    "disk": "proxy killed while the job was at the stand-in: sent but its id not yet"
    " recorded, or its result fetched but not yet stored",
    "restart": "stand-in restart lost the job or its result; re-run (lost_job_policy=rerun)",
    "outage": "connection cut after the stand-in took the job, before its 202 arrived",
}


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    figures: dict[str, object] = field(default_factory=dict)
    duplicates: Counter[str] = field(default_factory=Counter)

    @property
    def lost(self) -> int:
        value = self.figures["lost"]
        assert isinstance(value, int)
        return value


def judge(run: Run) -> Verdict:
    verdict = Verdict()
    writes = {k.rsplit("/", 1)[1]: n for k, n in run.final_writes.items() if f"/{COLLECTION}/" in k}
    attempts = run.ledger.attempts
    accepted = run.ledger.accepted()
    lost: list[str] = []
    for attempt in accepted:
        count = writes.get(attempt.key, 0)
        if count == 0:
            lost.append(f"{attempt.key} ({attempt.mode}) accepted but never ran")
        if attempt.mode == "store":
            _check_store_job(verdict, run, attempt, count, lost)
        if count > 1:
            for why in _causes(run, attempt):
                verdict.duplicates[why] += 1
                if why == UNEXPLAINED:
                    verdict.problems.append(f"{attempt.key} ran again with no fault to explain it")
    for key, count in writes.items():
        sent = attempts.get(key)
        if sent is None:
            verdict.problems.append(f"{key} ran {count} times but no client ever sent it")
        elif sent.outcome == "refused":
            verdict.problems.append(f"{key} was refused {sent.refusal} but ran {count} times")
    verdict.problems.extend(lost)
    _check_never_again(verdict, run, writes)
    if run.disk_full_reached < run.count("disk"):
        verdict.problems.append("a disk-full phase never filled the store")
    if run.disk_recovered < run.count("disk"):
        verdict.problems.append("after a disk-full phase the proxy did not take jobs again")
    store = [a for a in accepted if a.mode == "store"]
    unknown = sum(1 for a in attempts.values() if a.outcome == "unknown")
    unknown_ran = sum(1 for a in attempts.values() if a.outcome == "unknown" and a.key in writes)
    verdict.figures = {
        "seconds": round(run.seconds),
        "accepted store": len(store),
        "accepted true": len(accepted) - len(store),
        "results fetched": sum(1 for a in store if a.result is not None),
        "refused (status/errorNum: n)": dict(
            sorted((f"{s}/{n}", c) for (s, n), c in run.ledger.refusals.items())
        ),
        "no answer (proxy down), ran anyway": f"{unknown}, {unknown_ran}",
        "kills (SIGKILL)": run.count("kill"),
        "stand-in restarts": run.count("restart"),
        "stand-in refusing (503/21003) phases": run.count("refuse"),
        "stand-in outages": run.count("outage"),
        "disk-full phases (filled, recovered)": f"{run.disk_full_reached}, {run.disk_recovered}",
        "exactly-once checked": sum(1 for a in store if a.fetched and not _overlapping(run, a)),
        "lost": len(lost),
        "duplicates (writes run twice or more)": sum(
            1 for a in accepted if writes.get(a.key, 0) > 1
        ),
    }
    return verdict


def _check_store_job(
    verdict: Verdict, run: Run, attempt: Attempt, count: int, lost: list[str]
) -> None:
    if attempt.lost:
        lost.append(f"{attempt.key}: job {attempt.job_id} 404 although nobody took its result")
    elif attempt.fetched is None:
        lost.append(f"{attempt.key}: job {attempt.job_id} never finished")
    elif attempt.result is None:
        return  # a fetch whose answer was cut took it: the client's loss, as in ArangoDB
    elif attempt.result not in (201, 202, 409):
        verdict.problems.append(f"{attempt.key}: unclear result {attempt.result}")
    elif attempt.result == 409 and count < 2:
        verdict.problems.append(f"{attempt.key}: 409 although its write ran {count} time(s)")
    if attempt.fetched is not None and count > 1 and not _overlapping(run, attempt):
        verdict.problems.append(f"{attempt.key}: done without a fault yet ran {count} times")


UNEXPLAINED = "unexplained"


def _causes(run: Run, attempt: Attempt) -> list[str]:
    """For each repeated run of a write: the last fault between the run before and it."""
    times = run.repeats.get(attempt.key, [])
    causes = []
    for before, again in itertools.pairwise(times):
        faults = [
            f for f in run.faults if f.kind in REPEATS and f.start <= again and f.end >= before
        ]
        causes.append(REPEATS[max(faults, key=lambda f: f.start).kind] if faults else UNEXPLAINED)
    return causes


def _overlapping(run: Run, attempt: Attempt) -> set[str]:
    end = attempt.fetched if attempt.fetched is not None else float("inf")
    return {
        REPEATS[f.kind]
        for f in run.faults
        if f.kind in REPEATS and f.start <= end and f.end >= attempt.sent
    }


def _check_never_again(verdict: Verdict, run: Run, writes: dict[str, int]) -> None:
    times = [t for t, _ in run.snapshots]
    for attempt in run.ledger.accepted("store"):
        if attempt.fetched is None or attempt.result is None:
            continue
        i = bisect.bisect_right(times, attempt.fetched)
        if i == len(times):
            continue
        snapshot = run.snapshots[i][1].get(f"_system/{COLLECTION}/{attempt.key}", 0)
        if writes.get(attempt.key, 0) != snapshot:
            verdict.problems.append(
                f"{attempt.key}: fetched, then ran again after a kill "
                f"({snapshot} -> {writes.get(attempt.key, 0)})"
            )


def report(verdict: Verdict) -> str:
    lines = ["figures:"]
    lines += [f"  {name}: {value}" for name, value in verdict.figures.items()]
    lines.append("repeated runs by cause (the last fault between two runs of a write):")
    lines += [f"  {n} x {why}" for why, n in verdict.duplicates.most_common()] or ["  none"]
    lines.append(f"problems: {len(verdict.problems)}")
    lines += [f"  {p}" for p in verdict.problems[:50]]
    return "\n".join(lines)
