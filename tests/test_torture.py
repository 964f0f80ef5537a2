"""The torture harness in its short form: 10 SIGKILLs of the proxy, stand-in
restarts, refusals, an outage and a disk-full phase under steady load; then
every 202 is checked (tests/torture/verdict.py). `python -m tests.torture --long`
runs the long form."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.torture import Settings, judge, report, torture

pytestmark = pytest.mark.timeout(240)


async def test_short_torture_loses_nothing(tmp_path: Path) -> None:
    settings = Settings.short(seed=1)
    run = await torture(settings, tmp_path, say=lambda _line: None)
    verdict = judge(run)
    print(report(verdict))  # shown with -s or when the test fails
    assert verdict.lost == 0, report(verdict)
    assert verdict.problems == [], report(verdict)
    assert run.count("kill") == settings.kills
    assert (run.disk_full_reached, run.disk_recovered) == (1, 1)
    accepted = run.ledger.accepted()
    assert sum(1 for a in accepted if a.mode == "store") > 500
    assert sum(1 for a in accepted if a.mode == "true") > 100
    assert verdict.figures["exactly-once checked"] != 0, "no job ran free of faults"
