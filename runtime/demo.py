"""A small sample run for the quick start: what an email-triage agent would log."""

from __future__ import annotations

from uuid import UUID

from runtime.events import Event, NewEvent, new_event_id


class DemoEmailReceived(Event, tag="demo.email_received"):
    message_id: str
    sender: str
    subject: str
    text: str


class DemoLlmCalled(Event, tag="demo.llm_called"):
    model: str
    prompt: str
    completion: str
    input_tokens: int
    output_tokens: int
    offline: bool = True


class DemoReplyDrafted(Event, tag="demo.reply_drafted"):
    to: str
    subject: str
    text: str


def sample_run(n: int = 1) -> tuple[str, list[NewEvent]]:
    """The events of one run (stream ``run-<id>``), each caused by the one before."""
    run_id: UUID = new_event_id()
    received = NewEvent(
        body=DemoEmailReceived(
            message_id=f"<demo-{n}@example.com>",
            sender="ada@example.com",
            subject=f"Invoice #{1000 + n} overdue?",
            text=f"Hi, could you check whether invoice #{1000 + n} was paid? Thanks, Ada",
        ),
        run_id=run_id,
        producer="webhooks.email",
    )
    called = NewEvent(
        body=DemoLlmCalled(
            model="offline-small",
            prompt="Classify and draft a reply.",
            completion="billing question; reply with payment status",
            input_tokens=42,
            output_tokens=11,
        ),
        run_id=run_id,
        causation_id=received.event_id,
        producer="agent.triage",
    )
    drafted = NewEvent(
        body=DemoReplyDrafted(
            to="ada@example.com",
            subject=f"Re: Invoice #{1000 + n} overdue?",
            text=f"Hi Ada, invoice #{1000 + n} was paid on the 3rd. Best, the billing agent",
        ),
        run_id=run_id,
        causation_id=called.event_id,
        producer="agent.triage",
    )
    return f"run-{run_id}", [received, called, drafted]
