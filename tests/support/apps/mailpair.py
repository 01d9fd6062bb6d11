"""A two-agent app for the read side's tests: email triage with a model, a CRM tool, and
a drafted reply (the first quick start's agents; the sample application replaced them).

Run them with ``agentrt worker --app tests.support.apps.mailpair``.
"""

from __future__ import annotations

import msgspec

from runtime import Agent, Budget, Context, Event, ToolContext, tool
from webhooks.events import EmailReceived


class Customer(msgspec.Struct, frozen=True):
    id: str
    plan: str


class EmailClassified(Event, tag="triage.classified"):
    message_id: str
    label: str
    sender: str
    subject: str
    text: str
    customer: Customer | None = None


class Draft(msgspec.Struct, frozen=True):
    subject: str
    body: str


class ReplyDrafted(Event, tag="reply.drafted"):
    message_id: str
    to: str
    subject: str
    body: str


_CRM = {
    "ada@example.com": Customer(id="cus_1001", plan="business"),
    "grace@example.com": Customer(id="cus_1002", plan="team"),
}


@tool
async def lookup_customer(ctx: ToolContext, email: str) -> Customer:
    """Find the customer account of an email address (a stand-in for a CRM call)."""
    ctx.log.info("crm.lookup", email=email, idempotency_key=ctx.idempotency_key)
    return _CRM.get(email.lower(), Customer(id="unknown", plan="none"))


class Triage(Agent):
    name = "triage"
    subscribes = (EmailReceived,)
    tier = "fast"
    system = (
        "You triage a support inbox. Classify the email. Reply with one of:\n"
        "- billing: invoice, payment, refund, charge, paid\n"
        "- support: error, login, broken, crash, password\n"
        "- spam: prize, winner, lottery, crypto, offer"
    )
    tools = (lookup_customer,)
    budget = Budget(tokens=20_000, usd=0.10)

    async def handle(self, event: EmailReceived, ctx: Context) -> None:
        answer = await ctx.llm(f"Subject: {event.subject}\n\n{event.text}", tools=[])
        label = answer.text.removeprefix("[offline]").strip().split()[0].strip(".").lower()
        customer = None
        if label != "spam":
            customer = await ctx.tool(lookup_customer, email=event.sender.email)
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


class Responder(Agent):
    name = "responder"
    subscribes = (EmailClassified,)
    reads_ingress = False
    tier = "smart"
    system = "You write short, friendly replies to customer emails. Answer in JSON."

    async def handle(self, event: EmailClassified, ctx: Context) -> None:
        if event.label == "spam":
            return
        plan = event.customer.plan if event.customer else "none"
        prompt = (
            f"Draft a reply to this {event.label} email from a customer on the {plan} plan.\n"
            f"Subject: {event.subject}\n\n{event.text}"
        )
        draft = await ctx.llm(prompt, output=Draft)
        assert draft.output is not None
        ctx.emit(
            ReplyDrafted(
                message_id=event.message_id,
                to=event.sender,
                subject=draft.output.subject,
                body=draft.output.body,
            )
        )


agents = [Triage(), Responder()]
