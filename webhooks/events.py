"""The typed events ingress produces: one per kind of webhook, whatever the provider."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from runtime.events.model import Event


class Address(msgspec.Struct, frozen=True):
    email: str
    name: str = ""


class Attachment(msgspec.Struct, frozen=True):
    """Metadata only: attachment bytes stay in the raw payload kept for audit."""

    filename: str
    content_type: str
    size: int
    content_id: str | None = None


class EmailReceived(Event, tag="email.received"):
    """An inbound email, from Postmark, Mailgun, SendGrid or raw MIME."""

    source: str
    provider: str
    message_id: str
    sender: Address
    to: list[Address] = msgspec.field(default_factory=list)
    cc: list[Address] = msgspec.field(default_factory=list)
    subject: str = ""
    text: str = ""
    html: str = ""
    #: Header name and value pairs, in order, duplicates kept.
    headers: list[tuple[str, str]] = msgspec.field(default_factory=list)
    attachments: list[Attachment] = msgspec.field(default_factory=list)
    in_reply_to: str | None = None
    references: list[str] = msgspec.field(default_factory=list)
    #: The first message of the thread (References[0], else In-Reply-To, else
    #: this message): every message of one thread shares it.
    thread_key: str = ""
    date: str | None = None


class RowChanged(Event, tag="row.changed"):
    """A row inserted, updated, deleted or snapshotted, from Debezium or Supabase."""

    source: str
    provider: str
    table: str
    #: c (create), u (update), d (delete), r (snapshot read).
    op: str
    schema: str | None = None
    key: dict[str, Any] = msgspec.field(default_factory=dict)
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    #: Where the change sits in the database's own log (LSN, binlog file:pos, ...).
    source_position: str | None = None
    committed_at: datetime | None = None


class WebhookReceived(Event, tag="webhook.received"):
    """Any JSON body, from a source configured without a format."""

    source: str
    payload: Any
