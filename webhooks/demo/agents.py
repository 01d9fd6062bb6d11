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

import enum
import os
import re
from datetime import timedelta
from importlib.util import find_spec
from typing import Annotated, Any, ClassVar

import msgspec

from runtime import (
    Agent,
    ApprovalDecided,
    ApprovalRequested,
    Budget,
    Cache,
    Context,
    Event,
    MachineState,
    On,
    Plan,
    RecordedEvent,
    Specialist,
    StateMachine,
    Subtask,
    Supervision,
    SupervisionFinished,
    Supervisor,
    TaskAssigned,
    Where,
)
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


class ReplySent(Event, tag="support.reply_sent"):
    """The reply that went out (here: recorded; a real app hands it to its mail provider)."""

    message_id: str
    to: str
    subject: str
    body: str
    #: Who let it go: "reviewer" (low risk), or the approval's decider.
    approved_by: str


class TicketFailed(Event, tag="support.ticket_failed"):
    """A ticket the desk could not answer, and why (a human takes it from here)."""

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
    # The same email labelled twice costs one call; a nearly identical one too, when the
    # semantic extra (the bundled WordLlama embedder) is installed.
    cache = Cache(exact=True, semantic=0.97 if find_spec("wordllama") else None)

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


# -- the desk: a supervisor and its specialists -------------------------------------


class Draft(msgspec.Struct, frozen=True):
    subject: str
    body: str


class DeskPlan(Plan):
    """Research and a draft, side by side (the draft's writer looks the orders up too)."""

    subtasks: Annotated[list[Subtask], msgspec.Meta(min_length=2, max_length=3)]


#: Where the ticket starts in a desk request (after the plan line).
TICKET = "Ticket:"

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


def _customer(task: TaskAssigned) -> str:
    """The customer's address, from the subtask or the request it belongs to."""
    found = _EMAIL.search(task.description) or _EMAIL.search(task.request)
    return found.group(0) if found else ""


class Research(Specialist):
    """Looks the customer's orders up in the shop database and says what matters."""

    name = "research"
    tier = "fast"
    system = "You summarise a customer's orders for a support agent, in two sentences."
    tools = (find_orders,)

    async def perform(self, task: TaskAssigned, ctx: Context) -> Any:
        orders = await ctx.tool(find_orders, customer=_customer(task))
        listed = msgspec.json.encode(orders).decode()
        summary = await ctx.llm(f"{task.description}\nOrders: {listed}", tools=[])
        return {"orders": msgspec.to_builtins(orders), "summary": summary.text}


class Writer(Specialist):
    """Drafts the reply with the smart tier, in the customer's language."""

    name = "writer"
    tier = "smart"
    system = "You write short, friendly, accurate replies to a shop's customers. Answer in JSON."
    tools = (find_orders,)
    cache = Cache(exact=True)

    async def perform(self, task: TaskAssigned, ctx: Context) -> Any:
        ticket = task.request.partition(TICKET)[2].strip()
        draft = await ctx.llm(
            f"{task.description}. Write the reply's subject and body.\n{ticket}\n"
            f"subject: Re: {ticket.partition('subject: ')[2].splitlines()[0]}",
            output=Draft,
            tools=[],
        )
        assert draft.output is not None
        return msgspec.to_builtins(draft.output)


class Desk(Supervisor):
    """Plans each triaged ticket into subtasks for research and the writer, gives up on one
    at its timeout, and hands what came back to the reviewer."""

    name = "desk"
    subscribes = (Triaged,)
    reads_ingress = False
    tier = "fast"
    system = "You run a shop's support desk."
    workers = (Research, Writer)
    plan_type = DeskPlan
    budget = Budget(tokens=60_000, usd=0.50)

    def request(self, event: Event) -> str:
        assert isinstance(event, Triaged)
        # The plan line first: its quoted pairs name each subtask's worker and what to do
        # (the offline model plans from the first quoted strings; Claude reads them as a
        # suggestion). The email follows, unquoted.
        seconds = int(os.environ.get("AGENTRT_SAMPLE_TASK_TIMEOUT", "30"))
        return (
            f'Plan: "research" "Find the orders of {event.customer} this ticket is about" '
            f'then "writer" "Draft a reply in {event.language} to {event.name}", timeout '
            f"{seconds} each.\n{TICKET} a {event.urgency}-urgency {event.category} ticket in "
            f"{event.language} from {event.customer}, subject: {event.subject}\n\n{event.text}"
        )

    async def synthesise(self, supervision: Supervision, ctx: Context) -> Any:
        results = {t.worker: t.result for t in supervision.outcomes if t.status == "completed"}
        missing = [f"{t.worker}: {t.status} ({t.error})" for t in supervision.outcomes
                   if t.status != "completed"]  # fmt: skip
        return {"draft": results.get("writer"), "research": results.get("research"),
                "missing": missing}  # fmt: skip


# -- the reviewer: the ticket's state machine -----------------------------------------


class TicketState(MachineState, frozen=True, kw_only=True):
    """The reviewer's fold of a run: where the ticket is, what it is, the draft asked about."""

    ticket: Triaged | None = None
    proposed: Draft | None = None


class Ticket(enum.StrEnum):
    INTAKE = "intake"
    RESEARCH = "research"
    DRAFT = "draft"
    REVIEW = "review"
    COMPLETE = "complete"
    FAILED = "failed"


REVIEW = """Is this reply ready to send? Reply with one of:
- approve: thanks, sorry, refund, order, help, reply, regards, team, we, you
- revise: offline, lorem, todo, xxx, placeholder, subject, body"""


def risk(t: Triaged) -> int:
    """How risky an outbound reply to this ticket is: 0 (none) to 4."""
    score = {"high": 2, "normal": 1}.get(t.urgency, 0)
    score += {"complaint": 2, "billing": 1}.get(t.category, 0)
    return min(score, 4)


class Reviewer(StateMachine):
    """Moves each ticket intake -> research -> draft -> review -> complete | failed; review
    can send a draft back once. A reply at or above ``AGENTRT_SAMPLE_APPROVAL_RISK``
    (default 3) waits for a human's approval (``agentrt approve``), denied by default at
    its deadline (``AGENTRT_SAMPLE_APPROVAL_SECONDS``, default 600)."""

    name = "reviewer"
    subscribes = (Triaged, SupervisionFinished, ApprovalDecided)
    reads_ingress = False
    tier = "fast"
    system = "You review a support reply before it goes out. Answer with the label only."
    states = Ticket
    initial = Ticket.INTAKE
    transitions: ClassVar[dict[Ticket, set[Ticket]]] = {
        Ticket.INTAKE: {Ticket.RESEARCH, Ticket.FAILED},
        Ticket.RESEARCH: {Ticket.DRAFT, Ticket.FAILED},
        Ticket.DRAFT: {Ticket.REVIEW, Ticket.FAILED},
        Ticket.REVIEW: {Ticket.DRAFT, Ticket.COMPLETE, Ticket.FAILED},
    }
    state_version = 2

    def initial_state(self) -> TicketState:
        return TicketState(current=Ticket.INTAKE.value)

    def evolve(self, state: Any, event: RecordedEvent) -> Any:
        body = event.body
        if isinstance(body, Triaged):
            return msgspec.structs.replace(state, ticket=body)
        if isinstance(body, ApprovalRequested) and isinstance(body.details, dict):
            draft = msgspec.convert(body.details.get("draft"), Draft)
            return msgspec.structs.replace(state, proposed=draft)
        return super().evolve(state, event)

    async def handle(self, event: Any, ctx: Context) -> None:
        if isinstance(event, Triaged):
            ctx.transition(Ticket.RESEARCH, reason=f"{event.category}, {event.urgency} urgency")
            return
        ticket = ctx.state.ticket
        if ticket is None:  # not a ticket's run (another agent's supervision, say)
            return
        if isinstance(event, SupervisionFinished) and event.supervisor == "desk":
            await self._review(ticket, event, ctx)
        elif isinstance(event, ApprovalDecided):
            draft = ctx.state.proposed
            if event.approved and draft is not None:
                ctx.transition(Ticket.COMPLETE, reason=f"approved by {event.by or 'someone'}")
                ctx.emit(ReplySent(message_id=ticket.message_id, to=ticket.customer,
                                   subject=draft.subject, body=draft.body,
                                   approved_by=event.by or "human"))  # fmt: skip
            else:
                who = event.by or "someone"
                ctx.transition(Ticket.FAILED, reason=f"reply denied by {who}")
                reason = f"reply denied by {who}: {event.comment}"
                ctx.emit(TicketFailed(message_id=ticket.message_id, reason=reason))

    async def _review(self, ticket: Triaged, done: SupervisionFinished, ctx: Context) -> None:
        result = done.result if isinstance(done.result, dict) else {}
        if done.error or not result.get("draft"):
            why = done.error or "no draft came back: " + "; ".join(result.get("missing", []))
            ctx.transition(Ticket.FAILED, reason=why)
            ctx.emit(TicketFailed(message_id=ticket.message_id, reason=why))
            return
        ctx.transition(Ticket.DRAFT, reason="research and draft are back")
        draft = msgspec.convert(result["draft"], Draft)
        ctx.transition(Ticket.REVIEW)
        verdict = label((await ctx.llm(f"{draft.subject}\n\n{draft.body}\n\n{REVIEW}",
                                       tools=[])).text)  # fmt: skip
        if verdict == "revise":
            ctx.transition(Ticket.DRAFT, reason="the review sent it back")
            research = result.get("research") or {}
            redraft = await ctx.llm(
                f"Rewrite this reply to {ticket.name} about {ticket.subject!r} in "
                f"{ticket.language}, concrete and kind. Their orders: "
                f"{research.get('summary', 'unknown')}\nDraft: {draft.body}",
                output=Draft,
                tier="smart",
                tools=[],
            )
            assert redraft.output is not None
            draft = redraft.output
            ctx.transition(Ticket.REVIEW, reason="redrafted")
        threshold = int(os.environ.get("AGENTRT_SAMPLE_APPROVAL_RISK", "3"))
        if risk(ticket) >= threshold:
            seconds = float(os.environ.get("AGENTRT_SAMPLE_APPROVAL_SECONDS", "600"))
            ctx.request_approval(
                f"Send a reply to {ticket.customer}: {draft.subject!r}",
                details={"draft": msgspec.to_builtins(draft), "risk": risk(ticket),
                         "category": ticket.category, "urgency": ticket.urgency},
                deadline=await ctx.now() + timedelta(seconds=seconds), default="deny",
            )  # fmt: skip
            return  # the run waits; the decision comes as approval.decided
        ctx.transition(Ticket.COMPLETE, reason=f"risk {risk(ticket)} below {threshold}")
        ctx.emit(ReplySent(message_id=ticket.message_id, to=ticket.customer,
                           subject=draft.subject, body=draft.body,
                           approved_by="reviewer"))  # fmt: skip


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


agents = [Triage(), Desk(), Research(), Writer(), Reviewer(), Anomalies()]
