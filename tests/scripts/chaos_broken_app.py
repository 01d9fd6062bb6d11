"""A deliberately broken chaos app: ``tests/scripts/test_chaos.py`` shows the chaos run
catches it.

Two bugs of the kind a user could write: ``chaos_follower`` makes its side effect
outside a durable step (a direct ledger write, so every run of the handler repeats
it: the chaos run must count extra tool calls), and its handler fails on one
``chaos.noted`` in five (dead-lettered: the chaos run must count those activations
as lost).
"""

from __future__ import annotations

import uuid

from chaos_app import Intake, Noted, write_ledger

from runtime import Agent, Context
from webhooks.events import WebhookReceived


class LeakyFollower(Agent):
    name = "chaos_follower"
    subscribes = (WebhookReceived, Noted)
    system = "Acknowledge the note. Reply with one of: done, later"

    async def handle(self, event: WebhookReceived | Noted, ctx: Context) -> None:
        trigger = str(ctx.trigger.event_id)
        if isinstance(event, Noted):
            if uuid.UUID(event.webhook).int % 5 == 0:
                raise RuntimeError("broken on purpose: this note always fails")
            await ctx.llm(f"{self.name} acknowledges {event.webhook}", tools=[])
        # The bug under test: a side effect that is not a step.
        activation = str(ctx.activation_id)
        write_ledger(
            key=f"direct-{activation}", activation=activation, step=1, agent=self.name,
            trigger=trigger,
        )  # fmt: skip


agents = [Intake(), LeakyFollower()]
