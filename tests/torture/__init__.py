"""Torture harness: the proxy and the stand-in as real processes under load and faults.

    python -m tests.torture [--long] [--seed N]

The short form (also run by tests/test_torture.py) kills the proxy 10 times;
the long form 60 times, with more stand-in restarts, refusals, outages and
disk-full phases. See harness.py for the faults and verdict.py for the checks.
"""

from tests.torture.harness import Run, Settings, torture
from tests.torture.verdict import Verdict, judge, report

__all__ = ["Run", "Settings", "Verdict", "judge", "report", "torture"]
