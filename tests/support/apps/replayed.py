"""The demo's agents, changed on purpose, to replay the demo's runs against (tests/projections).

``Variant`` is the demo's triage with knobs; unchanged it must replay identical (it is
the control for every changed version below). Each list is an ``--app`` target:
``tests.support.apps.replayed:prompt_changed`` and so on. ``failing`` holds the orders
app with an auditor that always fails (a dead-lettered activation to replay).
"""

from __future__ import annotations

from typing import Any

from runtime.agents.agent import Agent
from runtime.agents.context import Context
from runtime.events.model import Event
from tests.support.apps.mailpair import EmailClassified, Responder, Triage, lookup_customer
from tests.support.apps.orders import Fulfilment, StockReserved
from webhooks.events import EmailReceived


class Noted(Event, tag="test.replay.noted"):
    message_id: str


class Variant(Triage):
    """The demo's triage (same code path, same requests) with a knob per change."""

    prompt = "Subject: {subject}\n\n{text}"
    look_up = True
    shout_email = False
    extra_emit = False
    extra_tool = False

    async def handle(self, event: EmailReceived, ctx: Context) -> None:
        text = self.prompt.format(subject=event.subject, text=event.text)
        answer = await ctx.llm(text, tools=[])
        label = answer.text.removeprefix("[offline]").strip().split()[0].strip(".").lower()
        customer = None
        if label != "spam" and self.look_up:
            email = event.sender.email.upper() if self.shout_email else event.sender.email
            customer = await ctx.tool(lookup_customer, email=email)
        if self.extra_tool:
            await ctx.tool(lookup_customer, email="extra@example.com")
        ctx.emit(
            EmailClassified(
                message_id=event.message_id,
                label=label,
                sender=event.sender.email,
                subject=event.subject,
                text=event.text,
                customer=customer,
            )
        )
        if self.extra_emit:
            ctx.emit(Noted(message_id=event.message_id))


class PromptChanged(Variant):
    prompt = "Subject: {subject}\n\nClassify this email:\n{text}"


class ToolArgChanged(Variant):
    shout_email = True


class ExtraEmit(Variant):
    extra_emit = True


class StepRemoved(Variant):
    look_up = False


class ExtraTool(Variant):
    extra_tool = True


class Grumpy(Agent):
    """Fails on every delivery: dead-lettered after ``max_deliveries``."""

    name = "grumpy"
    subscribes = (StockReserved,)
    reads_ingress = False
    fixed = False

    async def handle(self, event: StockReserved, ctx: Context) -> None:
        if not self.fixed:
            raise RuntimeError(f"cannot audit {event.order_id}")
        ctx.emit(Noted(message_id=event.order_id))


class Fixed(Grumpy):
    fixed = True


def _pair(triage: Any) -> list[Agent]:
    return [triage, Responder()]


unchanged = _pair(Variant())
prompt_changed = _pair(PromptChanged())
tool_changed = _pair(ToolArgChanged())
extra_emit = _pair(ExtraEmit())
step_removed = _pair(StepRemoved())
extra_tool = _pair(ExtraTool())
#: The demo without its responder: replaying a demo run needs an agent it lacks.
no_responder = [Triage()]
failing = [Fulfilment(), Grumpy()]
fixed = [Fulfilment(), Fixed()]
