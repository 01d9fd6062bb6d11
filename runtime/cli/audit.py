"""``agentrt audit``: seal stream heads, verify the hash chains (promise 6)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.markup import escape

from runtime.cli.helpers import err, open_log, out, run, with_servers
from runtime.log import audit as audit_mod
from runtime.log.pool import connect
from runtime.settings import Settings

audit_app = typer.Typer(
    help="Tamper evidence: seal stream heads, verify the hash chains.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object")] = False,
    digest: Annotated[
        str | None,
        typer.Option(
            help="A seal digest kept outside the database (as `audit seal` prints it): "
            "the seal chain must contain it"
        ),
    ] = None,
) -> None:
    """Recompute every hash chain and seal; name the first altered or missing event."""
    kept: bytes | None = None
    if digest is not None:
        try:
            kept = bytes.fromhex(digest.strip())
        except ValueError:
            kept = None
        if kept is None or len(kept) != 32:
            raise typer.BadParameter(
                f"{digest!r} is not a seal digest (64 hex digits)", param_hint="--digest"
            )
    settings = with_servers(ctx.obj)

    async def go() -> audit_mod.VerifyReport:
        conn = await connect(runtime_url_or_owner(settings))
        try:
            total = await conn.fetchval(f'SELECT count(*) FROM "{settings.db_schema}".events')
            with err.status(f"verifying {total} events") as status:

                def progress(n: int) -> None:
                    status.update(f"verifying events: {n}/{total}")

                return await audit_mod.verify(
                    conn, settings.db_schema, on_progress=progress, kept_digest=kept
                )
        finally:
            await conn.close()

    report = run(go())
    if as_json:
        out.print_json(
            data={
                "ok": report.ok,
                "events": report.events,
                "streams": report.streams,
                "seals": report.seals,
                "problems": [str(p) for p in report.problems],
            }
        )
    elif report.ok:
        out.print(
            f"[green]ok[/]: {report.events} events in {report.streams} streams, "
            f"{report.seals} seals, every hash verified"
        )
    else:
        out.print(
            f"[red]FAILED[/]: {len(report.problems)} problem(s); first: {escape(str(report.first))}"
        )
        for p in report.problems[1:20]:
            out.print(f"  {escape(str(p))}")
    if not report.ok:
        raise typer.Exit(1)


@audit_app.command("seal")
def audit_seal(
    ctx: typer.Context,
    every: Annotated[
        float | None, typer.Option(help="Keep sealing every N seconds (otherwise seal once)")
    ] = None,
) -> None:
    """Seal the events since the last seal: their stream heads and commit order.

    Runs ``seal_log()`` in the database (as the log's owner), so the runtime
    role may run it without any privilege on the seal tables. Concurrent
    sealers queue on one lock; the seal chain stays linear.
    """
    settings = with_servers(ctx.obj)

    async def go() -> None:
        lg = await open_log(settings)
        hinted = False
        try:
            while True:
                async with lg.pool.acquire() as conn:
                    result = await audit_mod.seal(conn, settings.db_schema)
                if result is None:
                    out.print("nothing new to seal")
                else:
                    out.print(
                        f"seal {result.seal_id}: {result.head_count} stream heads, "
                        f"{result.event_count} events, digest {result.digest.hex()}"
                    )
                    if not hinted:
                        err.print(
                            "[dim]keep the digest outside the database; "
                            "`agentrt audit verify --digest HEX` checks the log against it[/]"
                        )
                        hinted = True
                if every is None:
                    return
                await asyncio.sleep(every)
        finally:
            await lg.pool.close()

    run(go())


def runtime_url_or_owner(settings: Settings) -> str:
    """Read-only work (verify) connects as the owner URL: it may run before roles exist."""
    return settings.require_database_url()
