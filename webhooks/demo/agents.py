"""The support desk: the sample application ``agentrt up`` and ``agentrt demo`` run.

An inbound support email (Postmark, Mailgun, SendGrid or raw MIME) is triaged
by a fast-tier model (category, urgency, language). Then the ``desk``, a
supervisor, plans the work: research (a specialist that looks the customer's
orders up in the shop's PostgreSQL table), a draft reply (a specialist with
the smart tier) and a review; the ticket moves through a state machine
(intake -> research -> draft -> review -> complete | failed; review can send
it back to draft), and a reply above the configured risk needs a human's
approval before it goes out. A ``row.changed`` on the shop's ``orders``
table (Debezium or Supabase) reaches the ``anomalies`` agent, which flags
refunds larger than the order and totals changed after payment.

With ``ANTHROPIC_API_KEY`` the agents call Claude; without, the offline model.
Only the public API is imported (``runtime``), and the event types of the ingress.
"""

from __future__ import annotations

import msgspec

from runtime import Agent, Budget, Context, Event, On, Where
from webhooks.demo.shop import find_orders
from webhooks.events import EmailReceived, RowChanged

# -- events ---------------------------------------------------------------------


class Triaged(Event, tag="support.triaged"):
    """An email read and labelled: what the desk plans from."""

    message_id: str
    customer: str
    name: str
    subject: str
    text: str
    category: str
    urgency: str
    language: str


class Ignored(Event, tag="support.ignored"):
    """An email the desk does not answer (spam), and why."""

    message_id: str
    reason: str


class AnomalyFlagged(Event, tag="shop.anomaly_flagged"):
    """An order change that looks wrong, with the rules it broke and the model's summary."""

    order_id: str
    customer: str
    reasons: list[str]
    summary: str


# -- triage -----------------------------------------------------------------------

CATEGORIES = """Which category is this email? Reply with one of:
- billing: invoice, charged, charge, twice, refund, payment, paid, card, remboursement, rechnung, factura, reembolso
- technical: login, password, error, broken, crash, page, dashboard, passwort, fehler, erreur, contraseña
- shipping: delivery, package, parcel, arrived, shipped, box, damaged, bestellung, paket, angekommen, livraison, colis, pedido, envío, caja, llegó
- complaint: unhappy, third, time, nobody, answered, cancel, unacceptable, disappointed, enttäuscht, déçu
- spam: prize, winner, lottery, crypto, offer, claim"""  # noqa: E501

URGENCY = """How urgent is this email? Reply with one of:
- high: today, immediately, urgent, cancel, third, twice, error, broken, dringend, urgent, urgente
- normal: please, help, check, question, bitte, merci, gracias
- low: thanks, worked, fyi, danke"""

LANGUAGES = """Which language is this email written in? Reply with one of:
- en: the, and, my, is, please, you, I, for, was, have
- de: der, die, das, und, ist, nicht, bitte, meine, sie, aber, ich, noch
- fr: le, la, les, et, est, je, pas, merci, ma, de, il, une
- es: el, la, los, y, es, con, por, llegó, pueden, gracias, mi, una"""


def label(text: str) -> str:
    """The label a model answered (its first word), lower case, without the offline mark."""
    words = text.removeprefix("[offline]").strip().split()
    return words[0].strip(".,:;\"'*").lower() if words else ""


class Triage(Agent):
    """Reads an inbound email and labels it with a fast model: category, urgency, language."""

    name = "triage"
    subscribes = (EmailReceived,)
    tier = "fast"
    system = "You triage the support inbox of an online shop. Answer with the label only."
    budget = Budget(tokens=20_000, usd=0.05)

    async def handle(self, event: EmailReceived, ctx: Context) -> None:
        email = f"From: {event.sender.email}\nSubject: {event.subject}\n\n{event.text}"
        category = label((await ctx.llm(f"{email}\n\n{CATEGORIES}", tools=[])).text)
        if category == "spam":
            ctx.emit(Ignored(message_id=event.message_id, reason="spam"))
            return
        urgency = label((await ctx.llm(f"{email}\n\n{URGENCY}", tools=[])).text)
        language = label((await ctx.llm(f"{email}\n\n{LANGUAGES}", tools=[])).text)
        ctx.emit(
            Triaged(
                message_id=event.message_id,
                customer=event.sender.email,
                name=event.sender.name or event.sender.email,
                subject=event.subject,
                text=event.text,
                category=category,
                urgency=urgency,
                language=language,
            )
        )


# -- order anomalies --------------------------------------------------------------


class Anomalies(Agent):
    """Watches the shop's orders table (Debezium or Supabase) and flags changes that look
    wrong: a refund larger than the order, a total changed after payment, a refund of an
    order never paid."""

    name = "anomalies"
    # A filter as data: the relay, `agentrt agents` and the runs table show it.
    subscribes = (On(RowChanged, where=Where(table="orders", op="u")),)
    tier = "fast"
    system = "You review suspicious changes to a shop's orders. Say in one sentence what happened."
    tools = (find_orders,)

    async def handle(self, event: RowChanged, ctx: Context) -> None:
        if event.after is None:
            return
        after, before = event.after, event.before or {}
        reasons = []
        total = int(after.get("total_cents") or 0)
        refunded = int(after.get("refunded_cents") or 0)
        if refunded > total:
            reasons.append(f"refunded {refunded / 100:.2f} of an order of {total / 100:.2f}")
        old_total = before.get("total_cents")
        if old_total and before.get("status") == "paid" and total >= 5 * int(old_total):
            reasons.append(f"total changed from {int(old_total) / 100:.2f} to "
                           f"{total / 100:.2f} after payment")  # fmt: skip
        if after.get("status") == "refunded" and before.get("status") not in ("paid", None):
            reasons.append(f"refunded from status {before.get('status')!r}")
        if not reasons:
            return
        customer = str(after.get("customer", ""))
        history = await ctx.tool(find_orders, customer=customer) if customer else []
        change = msgspec.json.encode({"before": before, "after": after}).decode()
        summary = await ctx.llm(
            f"Order change: {change}\nRules broken: {'; '.join(reasons)}\n"
            f"The customer's orders: {msgspec.json.encode(history).decode()}",
            tools=[],
        )
        ctx.emit(AnomalyFlagged(order_id=str(after.get("id", "?")), customer=customer,
                                reasons=reasons, summary=summary.text))  # fmt: skip


agents = [Triage(), Anomalies()]
