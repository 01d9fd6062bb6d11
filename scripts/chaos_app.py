"""The agents ``scripts/chaos.py`` runs: durable steps whose real executions can be counted.

``intake`` reacts to every generic webhook (``webhook.received``): a model call,
then the ``ledger`` tool, then it emits ``chaos.noted``. ``follower`` reacts to
the same webhooks (the ``ledger`` tool) and to each ``chaos.noted`` the relay
brings it (a model call, then the ``ledger`` tool). So every accepted webhook
makes three activations, two model steps and three tool steps.

The ``ledger`` tool is the side effect being counted: each real execution
appends one line to ``$CHAOS_LEDGER_DIR/ledger-<pid>.jsonl`` (one ``write`` on
an ``O_APPEND`` descriptor, so a SIGKILL leaves whole lines; the scenario kills
processes, not the machine, so the page cache is durable enough) and returns
the idempotency key and a nonce naming that execution, so the log's recorded
result says which execution it kept.

Run with ``agentrt worker --app chaos_app`` (``scripts/`` on ``PYTHONPATH``).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

from runtime import Agent, Context, Event, ToolContext, tool
from webhooks.events import WebhookReceived


class Noted(Event, tag="chaos.noted"):
    """What ``intake`` emits for each webhook; ``follower`` reacts to it."""

    webhook: str
    verdict: str


_ledger_fd: int | None = None


def _ledger() -> int:
    global _ledger_fd
    if _ledger_fd is None:
        folder = os.environ.get("CHAOS_LEDGER_DIR")
        if not folder:
            raise RuntimeError("CHAOS_LEDGER_DIR is not set: the ledger tool has nowhere to write")
        path = os.path.join(folder, f"ledger-{os.getpid()}.jsonl")
        _ledger_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    return _ledger_fd


def write_ledger(*, key: str, activation: str, step: int, agent: str, trigger: str) -> str:
    """Append one execution to this process's ledger; its nonce."""
    nonce = uuid.uuid4().hex
    line = {
        "key": key,
        "activation": activation,
        "step": step,
        "agent": agent,
        "trigger": trigger,
        "nonce": nonce,
        "pid": os.getpid(),
        "at": time.time(),
    }
    os.write(_ledger(), (json.dumps(line) + "\n").encode())
    return nonce


@tool
async def ledger(ctx: ToolContext, agent: str, trigger: str) -> dict[str, Any]:
    """Record that this agent acted on this event (the side effect the chaos run counts)."""
    key = ctx.idempotency_key
    nonce = write_ledger(
        key=key, activation=ctx.activation_id, step=ctx.step, agent=agent, trigger=trigger
    )
    return {"key": key, "nonce": nonce}


class Intake(Agent):
    name = "chaos_intake"
    subscribes = (WebhookReceived,)
    system = "Judge the webhook. Reply with one of: accept, review"
    tools = (ledger,)

    async def handle(self, event: WebhookReceived, ctx: Context) -> None:
        trigger = str(ctx.trigger.event_id)
        answer = await ctx.llm(f"{self.name} judges webhook {trigger}: {event.payload}", tools=[])
        await ctx.tool(ledger, agent=self.name, trigger=trigger)
        verdict = "review" if "review" in answer.text else "accept"
        ctx.emit(Noted(webhook=trigger, verdict=verdict))


class Follower(Agent):
    name = "chaos_follower"
    subscribes = (WebhookReceived, Noted)
    system = "Acknowledge the note. Reply with one of: done, later"
    tools = (ledger,)

    async def handle(self, event: WebhookReceived | Noted, ctx: Context) -> None:
        trigger = str(ctx.trigger.event_id)
        if isinstance(event, Noted):
            prompt = f"{self.name} acknowledges {event.verdict} of webhook {event.webhook}"
            await ctx.llm(prompt, tools=[])
        await ctx.tool(ledger, agent=self.name, trigger=trigger)


agents = [Intake(), Follower()]
