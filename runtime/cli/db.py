"""``agentrt db``: migrations and the log's append-only guards."""

from __future__ import annotations

import typer
from rich.markup import escape

from runtime.cli.helpers import err, out, run, with_servers
from runtime.log import migrations
from runtime.log.pool import runtime_url

db_app = typer.Typer(
    help="Schema migrations and the log's append-only guards.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")


@db_app.command("migrate")
def db_migrate(ctx: typer.Context) -> None:
    """Apply pending migrations; create the owner and runtime roles where allowed."""
    settings = with_servers(ctx.obj)
    report = run(migrations.migrate(settings))
    for label in report.applied:
        out.print(f"applied  {label}")
    if not report.applied:
        out.print(f"up to date ({len(report.already_applied)} migrations applied)")
    if report.roles_separated:
        out.print(
            f"roles: owner {settings.owner_role!r} (NOLOGIN), runtime {settings.app_role!r} "
            "(INSERT and SELECT on the log)"
        )
    for note in report.notes:
        err.print(f"[yellow]note:[/] {escape(note)}")


@db_app.command("status")
def db_status(ctx: typer.Context) -> None:
    """Migrations applied and pending, and which append-only guards are in force."""
    settings = with_servers(ctx.obj)
    runtime_role = None
    if settings.runtime_database_url is not None:
        from urllib.parse import urlsplit

        runtime_role = urlsplit(runtime_url(settings)).username
    st = run(migrations.status(settings, runtime_role=runtime_role))
    out.print(f"server   PostgreSQL {st.server_version}, connected as {st.connect_role!r}")
    out.print(f"schema   {settings.db_schema!r} " + ("exists" if st.schema_exists else "MISSING"))
    for label in st.applied:
        flag = "  [red](changed since applied)[/]" if label in st.changed else ""
        out.print(f"applied  {label}{flag}")
    for label in st.pending:
        out.print(f"[yellow]pending  {label}[/]")
    for g in st.guards:
        mark = "[green]in force[/]" if g.in_force else "[red]NOT in force[/]"
        out.print(f"guard    {g.name:34} {mark}  {escape(g.detail)}")
    off = [g for g in st.guards if not g.in_force]
    if off:
        err.print(
            f"[red]warning:[/] {len(off)} guard(s) not in force: "
            + escape("; ".join(f"{g.name} ({g.detail})" for g in off))
        )
    if st.pending or st.changed or off or not st.guards:
        raise typer.Exit(1)
