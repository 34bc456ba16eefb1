"""Smoke test of `python -m tools.bench` and `python -m tools.bench parked`: the commands run end
to end on their own servers with tiny counts and report every figure, with sane values. Not a timed
test: no figure is compared with a target here (docs/performance.md has the real runs)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers.stacks import run_command
from temporalio.api.enums.v1 import EventType

from domain.models import CancellationReason, RequestCancellationInput
from tools.bench.driver import run_units
from tools.bench.mix import (
    DEFAULT_MIX,
    INSTANT,
    PATHS,
    SILENT,
    Unit,
    allocate,
    build_units,
    unit_count,
)
from tools.bench.run import slice_order, split

pytestmark = pytest.mark.e2e

# The bench is a developer tool run from the checkout (tools/ is not installed).
BENCH = (sys.executable, "-m", "tools.bench")
COUNT = 10
ROUNDS = 2
ONE_S = timedelta(seconds=1)


async def bench_json(*args: str) -> dict[str, Any]:
    """`python -m tools.bench ARGS --json`, which must succeed: its report."""
    ran = await run_command(*BENCH, *args, "--json", timeout=240)
    assert ran.returncode == 0, ran.stderr[-3000:]
    parsed: dict[str, Any] = json.loads(ran.stdout)
    return parsed


def ordered(stats: dict[str, float]) -> bool:
    return 0 < stats["p50"] <= stats["p95"] <= stats["p99"]


def test_allocation_follows_the_mix() -> None:
    assert allocate(100, DEFAULT_MIX) == {
        "instant": 30,
        "accept": 45,
        "reject": 10,
        "silent": 5,
        "coupon": 10,
    }
    for count in (6, 7, 10, 33, 500):
        got = allocate(count, DEFAULT_MIX)
        assert sum(got.values()) == count
        assert got["coupon"] % 2 == 0
        assert all(got[p] >= 1 for p in PATHS)


def test_slices_cover_every_unit_once_in_order() -> None:
    units, _ = build_units("t", "product", allocate(500, DEFAULT_MIX), silent_window=ONE_S)
    assert unit_count(allocate(500, DEFAULT_MIX)) == len(units) == 475
    for rounds in (1, 2, 4, 7, len(units)):
        slices = split(units, rounds)
        assert len(slices) == rounds
        assert [u for part in slices for u in part] == units
        sizes = {len(part) for part in slices}
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_every_round_has_the_mix_in_the_same_proportions() -> None:
    # A round with more silent sellers (whose window holds a slot) or coupon orders than
    # another would differ from it by its units, not by the machine's noise.
    for count, rounds in ((200, 4), (500, 4), (33, 7)):
        units, _ = build_units(
            "t", "product", allocate(count, DEFAULT_MIX), silent_window=ONE_S, rounds=rounds
        )
        slices = split(units, rounds)
        assert sorted(u.index for part in slices for u in part) == sorted(u.index for u in units)
        for path in PATHS:
            per_round = [sum(u.path == path for u in part) for part in slices]
            assert max(per_round) - min(per_round) <= 1, (count, rounds, path, per_round)
        # The silent sellers first in each round: their window runs while the rest does.
        for part in slices:
            waits = [u.window > timedelta(0) for u in part]
            assert waits == sorted(waits, reverse=True), (count, rounds)
            assert any(waits) or count < 100, (count, rounds)


def test_sides_alternate_so_drift_weighs_on_both() -> None:
    assert slice_order(4, ["product", "limit"]) == [
        ("product", 0),
        ("limit", 0),
        ("limit", 1),
        ("product", 1),
        ("product", 2),
        ("limit", 2),
        ("limit", 3),
        ("product", 3),
    ]
    assert slice_order(2, ["limit"]) == [("limit", 0), ("limit", 1)]
    assert slice_order(2, ["product", "limit", "reference-4"]) == [
        ("product", 0),
        ("limit", 0),
        ("reference-4", 0),
        ("reference-4", 1),
        ("limit", 1),
        ("product", 1),
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rounds", "0"], "Invalid value for --rounds: 0 rounds: between 1 and 9"),
        (["--rounds", "10"], "Invalid value for --rounds: 10 rounds: between 1 and 9"),
        (["--mix", "instant=1,later=2"], "Invalid value for --mix: unknown path 'later'"),
        (["--sides", "product,nope"], "Invalid value for --sides: unknown side 'nope'"),
    ],
)
async def test_bad_bench_options_are_refused_before_anything_starts(
    args: list[str], message: str
) -> None:
    ran = await run_command(*BENCH, "--count", str(COUNT), *args, timeout=60)
    assert ran.returncode == 2
    assert message in " ".join(ran.stderr.replace("│", " ").split())
    # Refused before its servers started: no orders were loaded, nothing was measured.
    assert "loading" not in ran.stdout + ran.stderr


@pytest.fixture(scope="module")
async def report() -> dict[str, Any]:
    return await bench_json(
        "--count", str(COUNT), "--concurrency", "8", "--rounds", str(ROUNDS), "--stats-settle", "0"
    )


def test_limit_reproduces_the_product_shape(report: dict[str, Any]) -> None:
    checks = report["shape_check"]
    assert set(checks) == {"instant", "accept", "reject", "silent", "coupon:S-1", "coupon:S-2"}
    assert all(check["match"] for check in checks.values()), checks


@pytest.mark.parametrize("name", ["limit", "product"])
def test_every_figure_is_there_and_sane(report: dict[str, Any], name: str) -> None:
    side = report["sides"][name]
    planned = allocate(COUNT, DEFAULT_MIX)
    assert side["errors"] == 0, side["error_samples"]
    assert side["cancellations"] == COUNT
    assert side["by_path"] == planned
    assert side["throughput_per_s"] > 0
    latency = side["latency_ms"]
    assert ordered(latency["request_to_terminal"])
    assert ordered(latency["request_to_terminal_excl_window"])
    assert ordered(latency["decision_to_confirmed"])
    # The silent seller's window is part of request->terminal: the p99 is past it.
    assert latency["request_to_terminal"]["p99"] >= 1000
    cpu = side["cpu_s_per_cancellation"]
    # The server's and PostgreSQL's figures are missing (None) on servers the user configured.
    assert cpu["worker"] > 0
    assert cpu["server"] is None or cpu["server"] > 0
    assert cpu["postgres"] is None or cpu["postgres"] >= 0
    threads = side["worker_cpu_s_per_cancellation_by_thread"]
    assert threads["main"] > 0 and threads["rust_core"] > 0
    history = side["history"]
    assert history["sample"] == COUNT
    assert history["events_per_cancellation"] > 20
    # At least: started, 2 activities, 2 upserts per cancellation.
    assert history["actions_per_cancellation"] >= 5
    assert side["rss_mib"]["worker_peak"] > 10
    assert side["rss_mib"]["server_peak"] is None or side["rss_mib"]["server_peak"] > 10
    assert side["updates_rejected"] == 0
    # Measured in ROUNDS slices: together they are the side, and its rate is theirs.
    slices = side["slices"]
    assert [s["round"] for s in slices] == list(range(1, ROUNDS + 1))
    assert sum(s["cancellations"] for s in slices) == COUNT
    assert side["duration_s"] == pytest.approx(sum(s["duration_s"] for s in slices))
    assert side["throughput_per_s"] == pytest.approx(COUNT / side["duration_s"])


def test_product_counts_its_ledger_and_matches_the_limit_shape(report: dict[str, Any]) -> None:
    product, limit = report["sides"]["product"], report["sides"]["limit"]
    ledger = product["ledger"]
    assert ledger["transactions_per_cancellation"] >= 2
    assert ledger["round_trips_per_cancellation"] > ledger["transactions_per_cancellation"]
    assert ledger["starter_round_trips_per_cancellation"] > 0
    assert limit["ledger"]["round_trips_per_cancellation"] == 0
    assert product["statuses"] == {
        "completed": COUNT - allocate(COUNT, DEFAULT_MIX)["reject"],
        "rejected": allocate(COUNT, DEFAULT_MIX)["reject"],
    }
    assert (
        product["history"]["events_per_cancellation"] == limit["history"]["events_per_cancellation"]
    )
    assert (
        product["history"]["actions_per_cancellation"]
        == limit["history"]["actions_per_cancellation"]
    )
    assert report["ratios"]["throughput_per_s"] > 0
    assert report["options"]["rounds"] == ROUNDS
    assert len(report["round_ratios"]) == ROUNDS and all(r > 0 for r in report["round_ratios"])


def test_reference_4_is_the_fixed_shape_on_every_path(report: dict[str, Any]) -> None:
    """reference-4: started, one timer, one update, 4 no-op activities; nothing else (no
    search attribute, no memo), whatever the path; measured in the same rounds."""
    ref = report["sides"]["reference-4"]
    assert ref["errors"] == 0, ref["error_samples"]
    assert ref["cancellations"] == COUNT
    assert ref["by_path"] == allocate(COUNT, DEFAULT_MIX)
    assert ref["history"]["actions_by_kind"] == {
        "workflow_started": 1.0,
        "timers": 1.0,
        "updates": 1.0,
        "activity_attempts": 4.0,
    }
    assert ref["history"]["actions_per_cancellation"] == 7
    # started, 4 workflow tasks of 3 events, 1 timer started and cancelled, the update's
    # 2, 4 activities of 3, completed.
    assert ref["history"]["events_per_cancellation"] == 36
    assert ref["updates_rejected"] == 0
    assert [s["round"] for s in ref["slices"]] == list(range(1, ROUNDS + 1))
    assert ref["throughput_per_s"] == pytest.approx(COUNT / ref["duration_s"])
    assert ordered(ref["latency_ms"]["decision_to_confirmed"])


def test_ratios_to_both_references_and_the_targets_judged_by_round(
    report: dict[str, Any],
) -> None:
    product, ref = report["sides"]["product"], report["sides"]["reference-4"]
    ratios = report["ratios_reference_4"]
    assert ratios["throughput_per_s"] == pytest.approx(
        product["throughput_per_s"] / ref["throughput_per_s"]
    )
    assert ratios["history.actions_per_cancellation"] == pytest.approx(
        product["history"]["actions_per_cancellation"] / 7
    )
    assert len(report["round_ratios_reference_4"]) == ROUNDS
    targets = report["targets"]
    shape_targets = {"billable actions per cancellation": 9, "history events per cancellation": 40}
    assert set(targets) == {
        "throughput vs reference-4",
        "throughput vs limit",
        "p95 (seller window excluded) vs limit",
        "worker CPU per cancellation vs limit",
        *shape_targets,
    }
    history = product["history"]
    for name, most in shape_targets.items():
        shape = targets.pop(name)
        figure = history[
            "actions_per_cancellation" if "actions" in name else "events_per_cancellation"
        ]
        assert shape["ratio"] == figure and shape["target"] == f"<= {most}"
        assert shape["verdict"] == ("met" if figure <= most else "missed")
    for name, target in targets.items():
        assert len(target["rounds"]) == ROUNDS, name
        low, high = target["spread"]
        assert low == min(target["rounds"]) and high == max(target["rounds"])
        assert target["verdict"] in ("met", "missed", "noisy"), name
        # A verdict on the figures only when every round agrees and nothing else loaded the
        # machine; otherwise the reason is given.
        if target["verdict"] == "noisy":
            assert target["why"], name
    assert targets["throughput vs limit"]["ratio"] == pytest.approx(
        report["ratios"]["throughput_per_s"]
    )


async def test_parked_reports_checkpoints_and_drain() -> None:
    report = await bench_json("parked", "--count", "12", "--checkpoints", "6,12")
    assert [c["target"] for c in report["checkpoints"]] == [6, 12]
    assert all(c["parked"] == c["target"] for c in report["checkpoints"])
    assert all(
        c["start_rate_per_s"] > 0 and c["worker_rss_mib"] > 10 for c in report["checkpoints"]
    )
    drain = report["drain"]
    assert drain["completed"] == 12 and drain["rate_per_s"] > 0
    assert ordered(drain["decision_to_confirmed_ms"])
    assert report["errors"] == 0


async def test_parked_without_drain_reports_the_checkpoints_and_stops(tmp_path: Path) -> None:
    """`--no-drain` answers the memory question (100,000 parked) without hours of drain."""
    out = tmp_path / "parked.json"
    ran = await run_command(
        *BENCH,
        "parked",
        "--count",
        "8",
        "--checkpoints",
        "4,8",
        "--no-drain",
        "--out",
        str(out),
        timeout=240,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "no drain (--no-drain)" in ran.stdout
    assert "drain rate" not in ran.stdout
    report = json.loads(out.read_text())
    assert report["drain"] is None and report["options"]["drain"] is False
    assert [(c["target"], c["parked"]) for c in report["checkpoints"]] == [(4, 4), (8, 8)]
    assert report["worker_rss_ratio_last_to_first"] > 0
    assert report["errors"] == 0


async def test_a_parked_run_stopped_by_sigterm_shuts_its_servers_down() -> None:
    """A long parked run is stopped from outside (a background job ignores Ctrl-C): it exits
    130 and leaves no PostgreSQL, dev server or worker of its own running."""
    # Short: PostgreSQL's Unix socket lives under it, and socket paths are limited to 107 bytes.
    tmp_path = Path(tempfile.mkdtemp(prefix="oc-bench-", dir="/tmp"))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE")
    }
    env["TMPDIR"] = str(tmp_path)  # the bench's servers keep their files here
    proc = await asyncio.create_subprocess_exec(
        *BENCH,
        "parked",
        "--count",
        "400",
        "--checkpoints",
        "5,400",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    assert proc.stdout is not None
    seen = b""
    try:
        async with asyncio.timeout(180):
            while b"parked 5:" not in seen:
                line = await proc.stdout.readline()
                assert line, f"the bench ended early:\n{seen.decode(errors='replace')}"
                seen += line
        assert servers_under(tmp_path), "the bench's servers should be running mid-run"

        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stdout.read(), 90)
        code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        shutil.rmtree(tmp_path, ignore_errors=True)

    assert code == 130, (seen + rest).decode(errors="replace")[-3000:]
    assert b"stopped" in rest
    assert servers_under(tmp_path) == []


def servers_under(root: Path) -> list[str]:
    """Command lines of live processes that mention `root` (the bench's servers do)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if str(root) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(cmdline)
    return found


class _Event:
    def __init__(self, event_type: int) -> None:
        self.event_type = event_type


class _Handle:
    """A workflow that waits for its seller at once and ends when the test says so."""

    def __init__(self, workflow_id: str, done: asyncio.Event) -> None:
        self.id = workflow_id
        self._done = done

    async def fetch_history_events(self, wait_new_event: bool = False) -> AsyncIterator[_Event]:
        yield _Event(EventType.EVENT_TYPE_TIMER_STARTED)

    async def result(self) -> str:
        await self._done.wait()
        return "completed"


class _SilentSide:
    """A side whose silent cancellations end only when the test lets them."""

    name = "product"
    always_decides: str | None = None

    def __init__(self) -> None:
        self.started: list[str] = []
        self.window_over = asyncio.Event()
        self.others_done = asyncio.Event()
        self.others_done.set()

    async def start(self, key: str, request: RequestCancellationInput, unit: Unit) -> Any:
        self.started.append(unit.path)
        done = self.window_over if unit.path == SILENT else self.others_done
        return _Handle(f"wf-{unit.index}", done)

    async def decide(self, handle: Any, request: RequestCancellationInput, decision: str) -> None:
        raise AssertionError("no seller decides on this side's paths")

    async def status(self, result: Any) -> str:
        return str(result)


async def test_a_silent_sellers_window_does_not_hold_a_slot() -> None:
    # Two slots, both taken by silent sellers: the instant cancellation behind them runs while
    # their windows do; before, it waited for a window to end (the machine idled meanwhile).
    side = _SilentSide()
    request = RequestCancellationInput(
        order_id="O-1", seller_id="S-1", buyer_id="B-1", reason=CancellationReason.OUT_OF_STOCK
    )
    silent = [Unit(index=i, path=SILENT, requests=[request], window=ONE_S) for i in (0, 1)]
    instant = Unit(index=2, path=INSTANT, requests=[request])
    run = asyncio.create_task(run_units(side, [*silent, instant], concurrency=2, timeout=10))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while INSTANT not in side.started:
        assert loop.time() < deadline, side.started
        await asyncio.sleep(0.01)
    assert not run.done()  # the silent ones still wait out their window
    side.window_over.set()
    finished = await asyncio.wait_for(run, 5)
    assert sorted(t.path for t in finished.timings) == [INSTANT, SILENT, SILENT]
    assert all(t.error is None for t in finished.timings), finished.timings
