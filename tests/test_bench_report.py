"""The bench's printed table: a ratio is shown only where both sides did the same work."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console

from tools.bench.report import bench_table, ratio_text, target_figure


def test_ratio_text() -> None:
    assert ratio_text(0.0442, 0.0365, "{:.4f}") == "1.21"
    assert ratio_text(7, 0, "{:.1f}") == "-"
    assert ratio_text(0.0073, 0.00001, "{:.4f}") == "-"  # prints as 0.0000
    assert ratio_text(None, 1.0) == "-"
    assert ratio_text(0.0073, 0.0001, "{:.4f}", compared=False) == "-"


def _side(worker: float, postgres: float, other: float) -> dict[str, Any]:
    return {
        "cancellations": 200,
        "cpu_s_per_cancellation": {
            "worker": worker,
            "postgres": postgres,
            "other_processes": other,
        },
    }


def test_the_table_compares_cpu_of_the_same_work_only() -> None:
    report = {
        "run_id": "t",
        "options": {"count": 200, "concurrency": 8, "rounds": 4},
        "sides": {
            "limit": _side(0.0365, 0.0, 0.0002),
            "product": _side(0.0442, 0.0073, 0.0001),
            "reference-4": _side(0.0309, 0.0001, 1.5e-15),
        },
    }
    console = Console(width=200, record=True)
    console.print(bench_table(json.loads(json.dumps(report))))
    lines = console.export_text().splitlines()
    worker = next(line for line in lines if "CPU s/cancellation: worker" in line)
    postgres = next(line for line in lines if "CPU s/cancellation: PostgreSQL" in line)
    other = next(line for line in lines if "other processes" in line)
    assert "1.21" in worker and "1.43" in worker
    assert postgres.split("│")[4].strip() == "-" and postgres.split("│")[6].strip() == "-"
    assert other.split("│")[6].strip() == "-"


def test_a_target_figure_is_printed_on_the_side_of_the_target_it_is() -> None:
    assert target_figure(1.2004, "<= 1.2") == "1.2004"
    assert target_figure(1.23, "<= 1.2") == "1.23"
    assert target_figure(0.8999, ">= 0.9") == "0.8999"
    assert target_figure(1.1996, "<= 1.2") == "1.20"  # meets, and reads as meeting
