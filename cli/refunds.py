"""`ordercancel refunds failed|retry` and `ordercancel reconcile`: the SRE's and finance's tools
for refunds that did not go through (R9, R10). The logic lives in `starter.refunds` and
`starter.reconcile`; this module parses, prints and sets exit codes.

Exit codes of `refunds retry`: 0 done (skips are not failures: a skipped cancellation is no
longer parked, or was held back), 1 some retries failed, an id is unknown, or the stack is
unreachable, 2 bad arguments, 130 interrupted (run the same command again: it retries only what
is still parked). `reconcile`: 0 the ledger and the provider agree (or every finding was
repaired by this --fix run), 1 findings remain.
"""

from __future__ import annotations

import getpass
import json
import re
import sys
from collections import Counter
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli import console as ui
from cli.console import console, err_console
from domain.models import RefundStage, RetryRefundRequest
from infra.stack import open_stack
from starter.reconcile import ReconcileReport, reconcile
from starter.refunds import (
    FailedRefund,
    RetryOutcome,
    RetryResult,
    RetrySummary,
    bulk_holds,
    failed_query,
    find_failed_ids,
    list_failed,
    parse_rate,
    parse_since,
    retry_plans,
    retry_refunds,
    summarize,
)

refunds_app = typer.Typer(
    help="Failed refunds: list those parked in refund_failed, retry one or all (R10).",
    no_args_is_help=True,
)


def _default_operator() -> str:
    try:
        user = getpass.getuser()
    except Exception:
        user = ""
    user = re.sub(r"[^A-Za-z0-9_.:-]", "-", user)[:64].lstrip("_.:-")
    return user or "sre"


def _since(moment: Any) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC" if moment is not None else "?"


def _failed_table(rows: list[FailedRefund], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in (
        "id",
        "order",
        "seller",
        "amount",
        "stage",
        "last error",
        "passes",
        "attempts to call the provider",
        "since",
    ):
        table.add_column(column, overflow="fold")
    for row in rows:
        # Texts from the provider or a user are shown as text, never read as console markup.
        table.add_row(
            escape(row.cancellation_id),
            escape(row.order_id or "?"),
            escape(row.seller_id or "?"),
            str(row.amount) if row.amount is not None else "?",
            escape(row.refund_stage or "?"),
            escape(row.last_error or ""),
            str(row.passes),
            str(row.provider_call_attempts),
            _since(row.failed_since),
        )
    return table


def _print_failed(rows: list[FailedRefund]) -> None:
    """Parked refunds the provider may take on a retry, and apart from them those it declined
    for good or reversed (a retry makes a new refund under a new key; a bulk retry leaves them
    out unless asked)."""
    declined = [r for r in rows if r.refund_stage == RefundStage.DECLINED.value]
    reversed_ = [r for r in rows if r.refund_stage == RefundStage.REVERSED.value]
    apart = {RefundStage.DECLINED.value, RefundStage.REVERSED.value}
    retryable = [r for r in rows if r.refund_stage not in apart]
    console.print(_failed_table(retryable, f"{len(retryable)} cancellation(s) in refund_failed"))
    if declined:
        console.print(
            _failed_table(
                declined,
                f"{len(declined)} declined for good by the provider: a retry makes a new"
                " refund (`refunds retry ID`, or `--all-failed --include-declined`)",
            )
        )
    if reversed_:
        console.print(
            _failed_table(
                reversed_,
                f"{len(reversed_)} reversed by the provider after it confirmed: talk to finance"
                " first (a way to pay the buyer back), then a retry makes a new refund"
                " (`refunds retry ID`, or `--all-failed --include-reversed`)",
            )
        )


@refunds_app.command("failed")
def failed(
    seller: Annotated[str | None, typer.Option(help="Only this seller's (SellerId)")] = None,
    since: Annotated[
        str | None,
        typer.Option(
            help="Only those parked at or after this: a duration (30m, 2h, 7d ago) or an ISO"
            " time. Compared with the ledger's refunds.failed_at (reversed_at for a reversal)",
        ),
    ] = None,
    query: Annotated[
        str | None,
        typer.Option(help="A visibility query ANDed to the refund_failed one"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """List the cancellations parked in refund_failed (Temporal visibility + the ledger)."""
    try:
        since_at = parse_since(since) if since else None
        failed_query(seller=seller, query=query)
    except ValueError as err:
        raise ui.bad_argument(str(err)) from None
    settings = ui.settings()

    async def main() -> list[FailedRefund]:
        async with open_stack(settings) as stack:
            return await list_failed(
                stack.client, stack.pool, seller=seller, since=since_at, query=query
            )

    rows = ui.run(main())
    if as_json:
        sys.stdout.write(json.dumps([r.model_dump(mode="json") for r in rows], indent=2) + "\n")
    else:
        _print_failed(rows)


# Up to this many results, a real run lists each retried cancellation with its receipt.
LIST_EVERY_RESULT = 50


def _summary_table(summary: RetrySummary) -> Table:
    table = Table(title="Dry run: nothing was changed" if summary.dry_run else None)
    table.add_column("id")
    table.add_column("outcome")
    table.add_column("detail", overflow="fold")
    style = {
        RetryOutcome.RETRIED: "green",
        RetryOutcome.WOULD_RETRY: "green",
        RetryOutcome.SKIPPED: "yellow",
        RetryOutcome.WOULD_SKIP: "yellow",
        RetryOutcome.ERROR: "red",
    }
    for r in summary.results:
        table.add_row(
            escape(r.cancellation_id), f"[{style[r.outcome]}]{r.outcome.value}[/]", escape(r.detail)
        )
    return table


def _skip_reasons(summary: RetrySummary) -> str:
    """Why they were skipped, truly: held back by this bulk run (declined or reversed, still
    parked) or no longer parked (retried by someone else, or not running)."""
    held = summary.held_back
    gone = summary.skipped - held
    reasons = ([f"{gone} no longer in refund_failed"] if gone else []) + (
        [f"{held} held back: declined or reversed, still in refund_failed"] if held else []
    )
    return f" ({'; '.join(reasons)})" if reasons else ""


def _skip_reasons_dry(summary: RetrySummary) -> str:
    held = summary.held_back
    gone = summary.count(RetryOutcome.WOULD_SKIP) - held
    reasons = ([f"{gone} not in refund_failed"] if gone else []) + (
        [f"{held} held back: declined or reversed"] if held else []
    )
    return f" ({'; '.join(reasons)})" if reasons else ""


def _print_summary(summary: RetrySummary, *, as_json: bool, interrupted: bool = False) -> None:
    if as_json:
        payload = {
            **summary.model_dump(mode="json"),
            "totals": summary.totals(),
            "interrupted": interrupted,
        }
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    # Dry runs and small runs list everything (a retried one with the key its refund uses);
    # large runs list what needs a look (skips and errors).
    shown = (
        summary
        if summary.dry_run or len(summary.results) <= LIST_EVERY_RESULT
        else summary.model_copy(
            update={
                "results": [r for r in summary.results if r.outcome is not RetryOutcome.RETRIED]
            }
        )
    )
    if shown.results:
        console.print(_summary_table(shown))
    if summary.dry_run:
        console.print(
            f"dry run: would retry {summary.count(RetryOutcome.WOULD_RETRY)}, would skip"
            f" {summary.count(RetryOutcome.WOULD_SKIP)}{_skip_reasons_dry(summary)},"
            f" errors {summary.errors}"
        )
    else:
        console.print(
            f"retried {summary.retried}, skipped {summary.skipped}{_skip_reasons(summary)},"
            f" errors {summary.errors}"
        )
    if interrupted:
        err_console.print(
            "[yellow]interrupted:[/yellow] run the same command again to finish the rest"
            " (only cancellations still in refund_failed are retried)"
        )


@refunds_app.command("retry")
def retry(
    ids: Annotated[
        list[str] | None, typer.Argument(help="Cancellation ids, e.g. cancel-O-1002~S-7")
    ] = None,
    all_failed: Annotated[
        bool, typer.Option("--all-failed", help="Every cancellation in refund_failed")
    ] = False,
    query: Annotated[
        str | None,
        typer.Option(help="With --all-failed: a visibility query ANDed to the refund_failed one"),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be retried; change nothing")
    ] = False,
    concurrency: Annotated[int, typer.Option(min=1, max=100, help="Updates in flight at once")] = 4,
    rate: Annotated[str, typer.Option(help="At most this many updates per second: 5/s, 120/m")] = (
        "10/s"
    ),
    operator: Annotated[
        str | None, typer.Option(help="Who retries (audit trail); default: your user name")
    ] = None,
    reason: Annotated[str, typer.Option(help="Why (audit trail)")] = "",
    include_declined: Annotated[
        bool,
        typer.Option(
            "--include-declined",
            help="With --all-failed: also those the provider declined for good (each gets a"
            " new refund under a new key)",
        ),
    ] = False,
    include_reversed: Annotated[
        bool,
        typer.Option(
            "--include-reversed",
            help="With --all-failed: also those the provider reversed after confirming them"
            " (each gets a new refund under a new key; talk to finance first)",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable summary")] = False,
) -> None:
    """Retry parked refunds (update `retry_refund`): each resumes under its idempotency key, or
    the next generation's when the provider declined or reversed it; each receipt names the
    key used (a dry run names it too). Safe to run twice or to interrupt: one no longer in
    refund_failed refuses and is counted as skipped. In bulk, refunds the provider declined
    for good or reversed are held back (skipped, listed with stage and error) unless
    --include-declined / --include-reversed."""
    if bool(ids) == all_failed:
        raise ui.bad_argument("give cancellation ids, or --all-failed (not both)")
    if query and not all_failed:
        raise ui.bad_argument("--query goes with --all-failed")
    if include_declined and not all_failed:
        raise ui.bad_argument("--include-declined goes with --all-failed")
    if include_reversed and not all_failed:
        raise ui.bad_argument("--include-reversed goes with --all-failed")
    try:
        per_second = parse_rate(rate)
        visibility = failed_query(query=query)
        request = RetryRefundRequest(
            operator_id=operator or _default_operator(),
            reason=reason or ("bulk retry" if all_failed else "retry") + " (ordercancel CLI)",
        )
    except ValueError as err:
        raise ui.bad_argument(str(err)) from None
    settings = ui.settings()
    seen: list[RetryResult] = []
    # Progress goes to stderr so that --json stays parseable on stdout.
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            ("would retry" if dry_run else "retried")
            + " {task.fields[retried]} "
            + ("would skip" if dry_run else "skipped")
            + " {task.fields[skipped]}"
        ),
        TextColumn("errors {task.fields[errors]}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )

    async def main() -> RetrySummary:
        async with open_stack(settings) as stack:
            targets = (
                await find_failed_ids(stack.client, visibility) if all_failed else list(ids or [])
            )
            if not targets:
                return RetrySummary(dry_run=dry_run, results=[])
            hold = (
                await bulk_holds(
                    stack.pool,
                    targets,
                    include_declined=include_declined,
                    include_reversed=include_reversed,
                )
                if all_failed
                else {}
            )
            plans = await retry_plans(stack.pool, targets) if dry_run else None
            task = progress.add_task(
                "checking" if dry_run else "retrying",
                total=len(dict.fromkeys(targets)),
                retried=0,
                skipped=0,
                errors=0,
            )

            counts: Counter[str] = Counter()
            column = {
                RetryOutcome.RETRIED: "retried",
                RetryOutcome.WOULD_RETRY: "retried",
                RetryOutcome.SKIPPED: "skipped",
                RetryOutcome.WOULD_SKIP: "skipped",
                RetryOutcome.ERROR: "errors",
            }

            def on_result(result: RetryResult) -> None:
                seen.append(result)
                counts[column[result.outcome]] += 1
                progress.update(
                    task,
                    advance=1,
                    retried=counts["retried"],
                    skipped=counts["skipped"],
                    errors=counts["errors"],
                )

            with progress:
                return await retry_refunds(
                    stack.client,
                    targets,
                    request=request,
                    concurrency=concurrency,
                    rate=per_second,
                    dry_run=dry_run,
                    on_result=on_result,
                    hold=hold,
                    plans=plans,
                )

    try:
        summary = ui.run(main())
    except KeyboardInterrupt:
        _print_summary(summarize(seen, dry_run=dry_run), as_json=as_json, interrupted=True)
        raise typer.Exit(130) from None
    if not summary.results and not as_json:
        console.print("nothing to retry: no cancellation in refund_failed matches")
    _print_summary(summary, as_json=as_json)
    if summary.errors:
        raise typer.Exit(1)


# --- reconcile --------------------------------------------------------------------------------


def _reconcile_table(report: ReconcileReport) -> Table:
    table = Table(
        title=f"Reconciliation: {report.ledger_refunds} ledger refund(s), "
        f"{report.provider_refunds} at the provider",
        title_justify="left",
    )
    for column in ("kind", "refund key", "cancellation", "detail", "action"):
        table.add_column(column, overflow="fold")
    if report.fix:
        table.add_column("fix", overflow="fold")
    for f in report.findings:
        cells = [f.kind.value, f.idempotency_key, f.cancellation_id or "-", f.detail, f.action]
        if report.fix:
            cells.append(
                "-"
                if f.fix_outcome is None
                else f.fix_outcome + (" (sent before)" if f.fix_duplicate else "")
            )
        table.add_row(*cells)
    return table


def reconcile_command(
    fix: Annotated[
        bool,
        typer.Option(
            "--fix",
            help="Repair status mismatches through the workflows (synthetic payment events);"
            " the rest is reported",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable report")] = False,
) -> None:
    """Compare the ledger's refunds with the payment provider's records (finance's report).
    Exit 1 while a mismatch remains unrepaired."""
    from workers.worker import build_provider

    settings = ui.settings()

    async def main() -> ReconcileReport:
        async with open_stack(settings) as stack:
            return await reconcile(
                stack.pool,
                build_provider(settings, stack.pool),
                client=stack.client,
                fix=fix,
                task_queue=settings.task_queue,
            )

    report = ui.run(main())
    if as_json:
        payload = {**report.model_dump(mode="json"), "totals": report.totals()}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        if report.findings:
            console.print(_reconcile_table(report))
        scope = f"{report.ledger_refunds} ledger and {report.provider_refunds} provider refund(s)"
        notes = []
        if report.never_at_provider:
            notes.append(
                f"{report.never_at_provider} declined or failed before the provider recorded"
                " it (the provider has none: no mismatch)"
            )
        if report.in_flight:
            notes.append(f"{report.in_flight} in flight (requested, not compared)")
        if report.status_checked or report.status_unchecked:
            notes.append(
                f"{report.status_checked} confirmed refund(s) checked for their current status"
                " at the provider"
                + (
                    f", {report.status_unchecked} could not be read"
                    if report.status_unchecked
                    else ""
                )
            )
        if notes:
            scope += " (" + "; ".join(notes) + ")"
        if report.findings:
            console.print(
                f"{len(report.findings)} finding(s) over {scope}: "
                + ", ".join(f"{k} {v}" for k, v in report.totals().items()),
                soft_wrap=True,
            )
        else:
            console.print(f"ledger and provider agree: {scope}", soft_wrap=True)
    # A scheduled run alerts on a mismatch nobody has repaired yet.
    if report.unresolved:
        raise typer.Exit(1)
