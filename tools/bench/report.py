"""The bench reports as rich tables (the JSON is the report dict itself)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

# (label, key path in a side's report, format)
ROWS: list[tuple[str, str, str]] = [
    ("cancellations completed", "cancellations", "{:.0f}"),
    ("errors", "errors", "{:.0f}"),
    ("cancellations completed/s", "throughput_per_s", "{:.1f}"),
    ("request→terminal p50 ms", "latency_ms.request_to_terminal.p50", "{:.0f}"),
    ("request→terminal p95 ms", "latency_ms.request_to_terminal.p95", "{:.0f}"),
    ("request→terminal p99 ms", "latency_ms.request_to_terminal.p99", "{:.0f}"),
    (
        "  same, seller window excluded, p95 ms",
        "latency_ms.request_to_terminal_excl_window.p95",
        "{:.0f}",
    ),
    ("decision→refund confirmed p50 ms", "latency_ms.decision_to_confirmed.p50", "{:.0f}"),
    ("decision→refund confirmed p95 ms", "latency_ms.decision_to_confirmed.p95", "{:.0f}"),
    ("decision→refund confirmed p99 ms", "latency_ms.decision_to_confirmed.p99", "{:.0f}"),
    ("CPU s/cancellation: worker", "cpu_s_per_cancellation.worker", "{:.4f}"),
    (
        "  worker: asyncio loop (activities)",
        "worker_cpu_s_per_cancellation_by_thread.main",
        "{:.4f}",
    ),
    (
        "  worker: workflow threads (sandbox)",
        "worker_cpu_s_per_cancellation_by_thread.workflow_threads",
        "{:.4f}",
    ),
    ("  worker: SDK Rust core", "worker_cpu_s_per_cancellation_by_thread.rust_core", "{:.4f}"),
    ("CPU s/cancellation: Temporal server", "cpu_s_per_cancellation.server", "{:.4f}"),
    ("CPU s/cancellation: PostgreSQL", "cpu_s_per_cancellation.postgres", "{:.4f}"),
    ("CPU s/cancellation: bench driver", "cpu_s_per_cancellation.driver", "{:.4f}"),
    ("CPU s/cancellation: other processes", "cpu_s_per_cancellation.other_processes", "{:.4f}"),
    ("history events/cancellation", "history.events_per_cancellation", "{:.1f}"),
    ("billable actions/cancellation", "history.actions_per_cancellation", "{:.2f}"),
    ("ledger round trips/cancellation", "ledger.round_trips_per_cancellation", "{:.1f}"),
    ("  of which pool resets", "ledger.pool_resets_per_cancellation", "{:.1f}"),
    ("ledger transactions/cancellation", "ledger.transactions_per_cancellation", "{:.1f}"),
    (
        "provider simulator round trips/cancellation",
        "ledger.provider_sim_round_trips_per_cancellation",
        "{:.1f}",
    ),
    ("PostgreSQL commits/cancellation (pg_stat)", "ledger.pg_commits_per_cancellation", "{:.1f}"),
    ("worker RSS MiB (peak)", "rss_mib.worker_peak", "{:.0f}"),
    ("Temporal server RSS MiB (peak)", "rss_mib.server_peak", "{:.0f}"),
]
# Rows whose figure is not the same work on every side: only the product has a ledger, and
# other processes are the machine's noise. Their ratios say nothing (a reference side's
# PostgreSQL CPU of 0.0001 s is its idle background, and 0.0073 against it is not "73x").
NOT_COMPARED = frozenset(
    {"cpu_s_per_cancellation.postgres", "cpu_s_per_cancellation.other_processes"}
)


def dig(node: Any, path: str) -> Any:
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float):
        return fmt.format(value)
    return str(value)


def bench_table(report: dict[str, Any]) -> Table:
    sides = report["sides"]
    limit, product = sides.get("limit", {}), sides.get("product", {})
    reference = sides.get("reference-4")
    opts = report["options"]
    table = Table(
        title=(
            f"python -m tools.bench: {opts['count']} cancellations per side, concurrency "
            f"{opts['concurrency']}, {opts.get('rounds', 1)} alternated round(s)"
            f" (run {report['run_id']})"
        ),
        caption=_caption(report),
    )
    table.add_column("figure")
    table.add_column("limit", justify="right")
    table.add_column("product", justify="right")
    table.add_column("product/limit", justify="right")
    if reference is not None:
        table.add_column("reference-4", justify="right")
        table.add_column("product/reference-4", justify="right")
    for label, path, fmt in ROWS:
        lim, prod = dig(limit, path), dig(product, path)
        compared = path not in NOT_COMPARED
        row = [label, _fmt(lim, fmt), _fmt(prod, fmt), ratio_text(prod, lim, fmt, compared)]
        if reference is not None:
            ref = dig(reference, path)
            row += [_fmt(ref, fmt), ratio_text(prod, ref, fmt, compared)]
        table.add_row(*row)
    return table


def _caption(report: dict[str, Any]) -> str | None:
    parts = []
    for label, key in (("limit", "round_ratios"), ("reference-4", "round_ratios_reference_4")):
        if report.get(key):
            parts.append(
                f"throughput ratio to {label} by round: "
                + " ".join(f"{r:.2f}" for r in report[key])
            )
    return "; ".join(parts) or None


def ratio_text(a: Any, b: Any, fmt: str = "{}", compared: bool = True) -> str:
    """a/b to two decimals; "-" when the row is not compared, either figure is missing, or b
    is nothing at the precision it is printed with."""
    if not compared or not (isinstance(a, int | float) and isinstance(b, int | float)):
        return "-"
    if float(fmt.format(b)) == 0:
        return "-"
    return f"{a / b:.2f}"


def target_figure(value: float, target: str) -> str:
    """`value` to two decimals, or more where two would put it on the other side of `target`
    (">= 0.8", "<= 1.2"): a ratio of 1.2004 against "<= 1.2" is 1.2004, not a "1.20" that
    reads as met beside the verdict "missed"."""
    op, _, number = target.partition(" ")
    limit = float(number)

    def meets(x: float) -> bool:
        return x >= limit if op == ">=" else x <= limit

    for digits in (2, 3, 4):
        text = f"{value:.{digits}f}"
        if meets(float(text)) == meets(value):
            return text
    return f"{value:.6f}"


def targets_table(report: dict[str, Any]) -> Table:
    """Issue 19's targets: the run's ratio, its spread over the rounds, the verdict."""
    table = Table(title="targets (met / missed in every round, else noisy: not judged)")
    for column in ("target", "", "figure", "rounds", "verdict"):
        table.add_column(column)
    for name, t in report["targets"].items():
        spread = t["spread"]
        goal = t["target"]
        table.add_row(
            name,
            goal,
            "-" if t["ratio"] is None else target_figure(t["ratio"], goal),
            "-"
            if spread is None
            else f"{target_figure(spread[0], goal)}-{target_figure(spread[1], goal)}",
            t["verdict"] + (f" ({t['why']})" if t["why"] else ""),
        )
    return table


def shape_table(report: dict[str, Any]) -> Table:
    table = Table(title="event shape per path: limit reproduces product")
    # upserts: every search-attribute upsert event, the SDK's `TemporalChangeVersion` ones (one
    # per patch, not billed) included.
    for column in ("path", "events", "activities", "timers", "upserts", "match"):
        table.add_column(column)
    for key, check in report.get("shape_check", {}).items():
        product = check["product"]
        table.add_row(
            key,
            str(check["events"]),
            str(product.get("ACTIVITY_TASK_SCHEDULED", 0)),
            str(product.get("TIMER_STARTED", 0)),
            str(product.get("UPSERT_WORKFLOW_SEARCH_ATTRIBUTES", 0)),
            "yes" if check["match"] else f"[red]no[/red] (limit: {check['limit']})",
        )
    return table
