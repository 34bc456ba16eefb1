"""`python -m tools.bench sweep`: the bench at several concurrencies, and a chart of throughput and
p95 (seller window excluded) against concurrency for the limit and the product.

Each level is a whole `python -m tools.bench` run (fresh servers). The chart needs matplotlib
(the project's `chart` extra); without it `--chart` is refused before the sweep starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from tools.bench.report import dig
from tools.bench.run import BenchOptions, Progress, run_bench


async def run_sweep(
    base: BenchOptions,
    levels: list[int],
    *,
    progress: Progress | None = None,
    note: Callable[[str], None] = print,
) -> dict[str, Any]:
    points = []
    for level in levels:
        note(f"sweep: concurrency {level}")
        options = dataclasses.replace(base, concurrency=level)
        report = await run_bench(options, progress=progress, note=note)
        point: dict[str, Any] = {"concurrency": level}
        for side in ("limit", "product"):
            data = report["sides"].get(side, {})
            point[side] = {
                "throughput_per_s": dig(data, "throughput_per_s"),
                "p95_ms": dig(data, "latency_ms.request_to_terminal_excl_window.p95"),
                "decision_to_confirmed_p95_ms": dig(data, "latency_ms.decision_to_confirmed.p95"),
                "errors": dig(data, "errors"),
                "load_avg_1m": dig(data, "load_avg_1m"),
            }
        point["ratios"] = report.get("ratios", {})
        points.append(point)
    peak = max(points, key=lambda p: p["limit"]["throughput_per_s"] or 0.0)
    return {"count": base.count, "points": points, "limit_peaks_at": peak["concurrency"]}


def sweep_table(sweep: dict[str, Any]) -> Table:
    table = Table(
        title=(
            f"python -m tools.bench sweep: {sweep['count']} cancellations per side and level; "
            f"the limit peaks at concurrency {sweep['limit_peaks_at']}"
        )
    )
    for column in (
        "concurrency",
        "limit /s",
        "product /s",
        "ratio",
        "limit p95 ms",
        "product p95 ms",
        "ratio",
    ):
        table.add_column(column, justify="right")
    for p in sweep["points"]:
        lim, prod = p["limit"], p["product"]
        table.add_row(
            str(p["concurrency"]),
            f"{lim['throughput_per_s'] or 0:.1f}",
            f"{prod['throughput_per_s'] or 0:.1f}",
            f"{p['ratios'].get('throughput_per_s') or 0:.2f}",
            f"{lim['p95_ms'] or 0:.0f}",
            f"{prod['p95_ms'] or 0:.0f}",
            f"{p['ratios'].get('latency_ms.request_to_terminal_excl_window.p95') or 0:.2f}",
        )
    return table


def sweep_chart(sweep: dict[str, Any], path: Path) -> bool:
    """Throughput and p95 against concurrency, limit and product; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    levels = [p["concurrency"] for p in sweep["points"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for side, style in (("limit", "o--"), ("product", "s-")):
        left.plot(levels, [p[side]["throughput_per_s"] for p in sweep["points"]], style, label=side)
        right.plot(levels, [p[side]["p95_ms"] for p in sweep["points"]], style, label=side)
    left.set(xlabel="concurrency (workflows in flight)", ylabel="cancellations completed/s")
    right.set(xlabel="concurrency (workflows in flight)", ylabel="p95 request→terminal, ms")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set_xticks(levels, [str(level) for level in levels])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"python -m tools.bench: {sweep['count']} cancellations per side and level"
        " (p95 without the silent seller's window)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
