"""Prints the fuzz suite's outcome counts per family at the end of the run."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from outcomes import SECONDS, TALLY  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    if not TALLY:
        return
    terminalreporter.section("fuzz outcomes")
    total = 0
    for family in sorted(TALLY):
        counts = TALLY[family]
        total += sum(counts.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        terminalreporter.write_line(f"{family:28s} {sum(counts.values()):4d} cases ({detail}), {SECONDS[family]:.1f} s")
    terminalreporter.write_line(f"{'all':28s} {total:4d} cases")
