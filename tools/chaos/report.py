"""The chaos run's table: faults injected by kind, cancellations by path, invariants checked,
violations (must be 0)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tools.chaos.run import ChaosReport

MAX_SHOWN = 40


def render(console: Console, report: ChaosReport) -> None:
    faults = Table(title="Faults injected", title_justify="left")
    faults.add_column("kind")
    faults.add_column("count", justify="right")
    faults.add_column("observed")
    for row in report.faults:
        faults.add_row(row.kind, str(row.count), row.detail)
    console.print(faults)

    if report.hostile:
        hostile = Table(title="Hostile input", title_justify="left")
        hostile.add_column("sent")
        hostile.add_column("count", justify="right")
        hostile.add_column("observed")
        for row in report.hostile:
            hostile.add_row(Text(row.kind), str(row.count), Text(row.detail))
        console.print(hostile)

    paths = Table(title="Cancellations by path", title_justify="left")
    for name in (
        "path",
        "n",
        "completed",
        "rejected",
        "withdrawn",
        "parked",
        "other",
        "refund gen ≥2",
        "coupons restored",
    ):
        paths.add_column(name, justify="left" if name == "path" else "right")
    totals = [0] * 8
    for path in report.paths:
        values = [
            path.cancellations,
            path.completed,
            path.rejected,
            path.withdrawn,
            path.parked,
            path.other,
            path.refund_generations_2plus,
            path.coupons_restored,
        ]
        totals = [a + b for a, b in zip(totals, values, strict=True)]
        paths.add_row(path.path, *(str(v) for v in values))
    paths.add_row("[bold]total[/bold]", *(f"[bold]{v}[/bold]" for v in totals))
    console.print(paths)

    checks = Table(title="Invariants", title_justify="left")
    checks.add_column("invariant")
    checks.add_column("meaning")
    checks.add_column("checked", justify="right")
    checks.add_column("violations", justify="right")
    for invariant in report.invariants:
        style = "green" if invariant.violations == 0 else "bold red"
        checks.add_row(
            invariant.name,
            invariant.meaning,
            str(invariant.checked),
            f"[{style}]{invariant.violations}[/{style}]",
        )
    console.print(checks)

    if report.violations:
        console.print(f"[bold red]{len(report.violations)} violations[/bold red]")
        for violation in report.violations[:MAX_SHOWN]:
            console.print(f"  - {violation}", markup=False)
        if len(report.violations) > MAX_SHOWN:
            console.print(f"  ... and {len(report.violations) - MAX_SHOWN} more")
    phases = ", ".join(f"{k} {v:.0f}s" for k, v in report.phases.items())
    verdict = (
        "[bold green]0 violations[/bold green]" if report.ok else "[bold red]FAILED[/bold red]"
    )
    console.print(
        f"{verdict}: {report.count} cancellations ({report.workflow_runs} workflow runs),"
        f" seed {report.seed}, {report.seconds:.0f}s ({phases})"
    )
    if report.data_dir:
        console.print(f"data, worker and server logs kept in {report.data_dir}")


def markdown(report: ChaosReport) -> str:
    """The same tables in Markdown, for docs/reliability.md."""
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in report.phases.items())
    out = [
        f"Run: `python -m tools.chaos --count {report.count} --seed {report.seed}`,"
        f" {report.seconds:.0f} s ({phases}),"
        f" {report.workflow_runs} workflow runs, **{len(report.violations)} violations**.",
        "",
        "| fault | count | observed |",
        "|---|--:|---|",
    ]
    out += [f"| {f.kind} | {f.count} | {f.detail} |" for f in report.faults]
    if report.hostile:
        out += ["", "| hostile input | count | observed |", "|---|--:|---|"]
        out += [f"| {h.kind} | {h.count} | {h.detail} |" for h in report.hostile]
    out += [
        "",
        "| path | n | completed | rejected | withdrawn | parked | refund gen ≥2"
        " | coupons restored |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for p in report.paths:
        out.append(
            f"| {p.path} | {p.cancellations} | {p.completed} | {p.rejected} | {p.withdrawn}"
            f" | {p.parked} | {p.refund_generations_2plus} | {p.coupons_restored} |"
        )
    out += ["", "| invariant | checked | violations |", "|---|--:|--:|"]
    out += [f"| {i.name}: {i.meaning} | {i.checked} | {i.violations} |" for i in report.invariants]
    return "\n".join(out) + "\n"
