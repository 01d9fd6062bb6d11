"""``agentrt agents``: an app's agents, their subscriptions (filters included), states and
response caches."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import msgspec
import typer
from rich.markup import escape
from rich.table import Table

from runtime.agents.agent import Agent
from runtime.agents.filters import describe
from runtime.agents.machine import StateMachine
from runtime.cli.helpers import load_agents, out


def register(app: typer.Typer) -> None:
    @app.command("agents")
    def agents(
        app_target: Annotated[
            str, typer.Option("--app", help="Module with your agents (as for `agentrt worker`)")
        ],
        json_: Annotated[bool, typer.Option("--json", help="JSON instead of a table")] = False,
    ) -> None:
        """List the app's agents: subscriptions with their filters, ingress, tier, states.

        Loading checks the app as a worker does (names, event types, filters
        against their types, state machine declarations), so a bad app fails here.
        """
        found = [describe_agent(a) for a in load_agents(app_target)]
        if json_:
            sys.stdout.buffer.write(msgspec.json.encode(found) + b"\n")
            sys.stdout.flush()
            return
        table = Table("agent", "subscribes", "ingress", "tier", "states", "cache",
                      header_style="bold")  # fmt: skip
        for a in found:
            subs = "\n".join(
                f"{escape(t)}" + "".join(f"\n  where {escape(w)}" for w in a["filters"].get(t, []))
                for t in a["subscribes"]
            )
            machine = a.get("machine")
            states = "-"
            if machine is not None:
                moves = [f"{s} -> {', '.join(n)}" for s, n in machine["transitions"].items()]
                final = f"final {', '.join(machine['final'])}"
                states = "\n".join([f"initial {machine['initial']}", *moves, final])
            cache = a["cache"]
            kinds = ["exact"] if cache and cache["exact"] else []
            if cache and cache["semantic"] is not None:
                kinds.append(f"semantic >= {cache['semantic']} ({cache['embedder']})")
            table.add_row(escape(a["name"]), subs, "yes" if a["reads_ingress"] else "no",
                          escape(a["tier"]), escape(states),
                          escape("\n".join(kinds)) if kinds else "-")  # fmt: skip
        out.print(table)


def describe_agent(agent: Agent) -> dict[str, Any]:
    """An agent as data: its subscriptions and filters, its response cache and its state
    machine, if any."""
    doc: dict[str, Any] = {
        "name": agent.name,
        "subscribes": sorted(agent.subscribed_types()),
        "filters": describe(agent.filters()),
        "reads_ingress": agent.reads_ingress,
        "tier": agent.tier,
        "cache": None,
    }
    if agent.cache is not None:
        c = agent.cache
        embedder = c.embedder.name if c.embedder is not None else None
        doc["cache"] = {"exact": c.exact, "semantic": c.semantic, "recent": c.recent,
                        "ttl": c.ttl, "embedder": embedder}  # fmt: skip
    if isinstance(agent, StateMachine):
        doc["machine"] = {
            "states": list(agent.state_names()),
            "initial": agent.initial_state().current,
            "transitions": {s: list(n) for s in agent.state_names() if (n := agent.allowed(s))},
            "final": list(agent.final_states()),
        }
    return doc
