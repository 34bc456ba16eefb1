"""Smoke test of `python -m tools.bench replay`: it replays recorded histories through the
worker's own workflow setup and reports a CPU figure per history (no figure is compared with a
target; docs/performance.md has the runs)."""

from __future__ import annotations

import json
import sys

from helpers.stacks import run_command

BENCH = (sys.executable, "-m", "tools.bench", "replay")


async def test_replay_reports_cpu_per_history() -> None:
    ran = await run_command(
        *BENCH,
        "--rounds",
        "2",
        "--history",
        "instant",
        "--history",
        "rejected",
        "--json",
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = json.loads(ran.stdout)
    rows = {row["history"]: row for row in report["histories"]}
    assert set(rows) == {"instant", "rejected"}
    assert rows["instant"]["workflow_id"] == "cancel-H-instant~S-1"
    for row in rows.values():
        assert row["events"] > 20
        # The workflow thread's CPU is part of the process's, and neither is nothing.
        assert 0 < row["workflow_thread_cpu_ms"] < row["process_cpu_ms"]
    assert report["bytecode"] is True  # as the bench's workers, whatever the environment


async def test_replay_refuses_an_unknown_history() -> None:
    ran = await run_command(*BENCH, "--history", "no-such-path", timeout=60)
    assert ran.returncode == 2
    assert "no history no-such-path recorded as 'lean-and-drain'" in ran.stderr
