"""What ``projections`` adds to ``agentrt up`` (entry point of the ``agentrt.services``
group): the query API and the projector, the runs in the status line, the demo's table."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg
from rich.console import Console
from rich.table import Table

from projections.api.auth import ensure_token
from projections.cli.api import explorer_url, usage_note

if TYPE_CHECKING:
    from runtime.cli.up import Service, UpPlan

#: Run statuses that still change (everything else is where the run ended or waits).
OPEN = ("running",)


def services(plan: UpPlan) -> list[Service]:
    from runtime.cli.up import Service

    token, path = ensure_token(plan.settings)
    url = plan.url(1)
    api = Service(
        "api",
        ["api", "--host", plan.host, "--port", str(plan.port + 1), "--app", plan.app],
        health=f"{url}/healthz",
        about=usage_note(url, path).splitlines(),
        env={"AGENTRT_API_TOKEN": token},
        open_url=explorer_url(url),
    )
    return [api, Service("projector", ["projector", "--app", plan.app])]


async def _fetch(plan: UpPlan, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(plan.settings.require_database_url())
    try:
        rows: list[asyncpg.Record] = await conn.fetch(
            sql.format(runs=f'"{plan.settings.read_schema}".runs'), *args
        )
        return rows
    except asyncpg.UndefinedTableError:  # the projector has not created it yet
        return []
    finally:
        await conn.close()


async def status(plan: UpPlan) -> dict[str, str]:
    """Runs by status and their cost so far, as the projector has them."""
    rows = await _fetch(plan, "SELECT status, count(*), sum(cost_usd) FROM {runs} GROUP BY 1")
    counts = ", ".join(f"{r[0]} {r[1]:,}" for r in sorted(rows, key=lambda r: -r[1]))
    cost = sum(float(r[2] or 0) for r in rows)
    return {"runs": counts or "none yet", "cost": f"${cost:.4f}"}


async def report(plan: UpPlan, console: Console, since: datetime, expected: int) -> bool:
    """Wait (60 s at most) until the ``expected`` runs started since ``since`` are no longer
    running, then print them; False if some did not get there."""
    sql = (
        "SELECT run_id, source, trigger_type, status, agents, llm_calls, tool_calls, "
        "input_tokens + output_tokens, cost_usd, error FROM {runs} "
        "WHERE started_at >= $1 ORDER BY started_at"
    )
    deadline = time.monotonic() + 60
    rows: list[asyncpg.Record] = []
    with console.status("agents at work..."):
        while time.monotonic() < deadline:
            rows = await _fetch(plan, sql, since)
            if len(rows) >= expected and not any(r["status"] in OPEN for r in rows):
                break
            await asyncio.sleep(0.25)
    table = Table(title=f"{len(rows)} runs", title_justify="left")
    for column in ("run", "source", "trigger", "status", "agents", "model", "tools", "tokens",
                   "cost"):  # fmt: skip
        table.add_column(column, justify="right" if column in ("model", "tools", "tokens",
                                                               "cost") else "left")  # fmt: skip
    for r in rows:
        colour = {"completed": "green", "waiting_for_approval": "yellow"}.get(r["status"], "red")
        table.add_row(
            str(r["run_id"])[:8], r["source"] or "", r["trigger_type"] or "",
            f"[{colour}]{r['status']}[/]", ", ".join(r["agents"]), str(r["llm_calls"]),
            str(r["tool_calls"]), f"{r[7]:,}", f"${float(r['cost_usd']):.4f}",
        )  # fmt: skip
    console.print(table)
    ok = len(rows) >= expected and not any(r["status"] in OPEN for r in rows)
    if not ok:
        console.print(f"[red]{expected} runs expected to settle within 60 s; "
                      f"{sum(r['status'] in OPEN for r in rows)} still running, "
                      f"{max(0, expected - len(rows))} not projected[/]")  # fmt: skip
    return ok
