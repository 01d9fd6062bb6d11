"""Sample webhooks for the support desk, as the providers post them, signed for a config.

Emails of several kinds and languages through Postmark (JSON), Mailgun
(form-encoded, signed in the body), SendGrid Inbound Parse (multipart) and raw
MIME (Standard Webhooks), and changes to the ``orders`` table the sample app
seeds, from Debezium (Standard Webhooks) and Supabase (Basic auth). Used by
``agentrt up --demo`` / ``agentrt demo`` and by the end-to-end benchmark.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import itertools
import secrets
import time
import uuid
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import msgspec

from webhooks.auth import sign
from webhooks.config import ResolvedSource

#: The sources the sample config has, by format (each name is its format's).
SAMPLE_SOURCES = ("postmark", "mailgun", "sendgrid", "mta", "debezium", "supabase")


def sample_config(path: Path) -> Path:
    """Write a sources file with fresh secrets at ``path`` unless one is there; its path.

    For a local installation: inline secrets, readable by this user only.
    """
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)

    def whsec() -> str:
        return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()

    text = f"""# Made by `agentrt up` for the sample application (local use: inline secrets).
[ingress]
partitions = 8

[sources.postmark]
format = "postmark"
auth = "basic"
username = "postmark"
password = "{secrets.token_urlsafe(18)}"

[sources.mailgun]
format = "mailgun"
auth = "mailgun"
signing_key = "{secrets.token_hex(16)}"

[sources.sendgrid]
format = "sendgrid"
auth = "basic"
username = "sendgrid"
password = "{secrets.token_urlsafe(18)}"

[sources.mta]
format = "mime"
auth = "standard"
secrets = ["{whsec()}"]

[sources.debezium]
format = "debezium"
auth = "standard"
secrets = ["{whsec()}"]

[sources.supabase]
format = "supabase"
auth = "basic"
username = "supabase"
password = "{secrets.token_urlsafe(18)}"
"""
    fd = path.open("x")
    path.chmod(0o600)
    with fd:
        fd.write(text)
    return path


def describe(source: ResolvedSource) -> str:
    """How a sender authenticates to ``source`` (printed by ``agentrt up``)."""
    auth = source.config.auth
    if auth == "standard":
        return f"Standard Webhooks secret {source.config.secrets[0]}"
    if auth == "basic":
        return f"Basic auth {source.username}:{source.password}"
    if auth == "mailgun":
        return f"Mailgun signing key {source.signing_key.decode() if source.signing_key else '?'}"
    return "no authentication"


@dataclasses.dataclass(frozen=True, slots=True)
class Email:
    sender: str
    name: str
    subject: str
    text: str
    language: str
    kind: str


#: The inbox: billing, technical, shipping, a complaint, spam; English, German,
#: French, Spanish. Customers are the seeded ones (their orders are in the table).
EMAILS: tuple[Email, ...] = (
    Email("ada@example.com", "Ada Lovelace", "Invoice 1042 charged twice?",
          "Hi, my card was charged twice for invoice 1042 (order A-1042). "
          "Could you refund one of the payments?", "en", "billing"),
    Email("grace@example.com", "Grace Hopper", "Login broken after password reset",
          "Since I reset my password yesterday the login page shows an error 500. "
          "I cannot reach my dashboard. Please help.", "en", "technical"),
    Email("klaus.weber@example.de", "Klaus Weber", "Bestellung A-2001 nicht angekommen",
          "Guten Tag, meine Bestellung A-2001 sollte letzte Woche ankommen, aber das Paket "
          "ist noch nicht da. Können Sie bitte nachsehen?", "de", "shipping"),
    Email("amelie.martin@example.fr", "Amélie Martin", "Remboursement de ma commande",
          "Bonjour, j'ai retourné la commande A-3001 il y a deux semaines et je n'ai "
          "toujours pas reçu le remboursement. Merci de vérifier.", "fr", "billing"),
    Email("ana.perez@example.org", "Ana María Pérez", "Caja dañada en el envío",
          "Hola, el pedido A-4001 llegó con la caja dañada y el producto roto. "
          "Adjunto la foto. ¿Pueden enviar un reemplazo?", "es", "shipping"),
    Email("ada@example.com", "Ada Lovelace", "This is the third time I write!",
          "I am very unhappy: nobody answered my two previous emails about the double "
          "charge. I want a refund today or I cancel my business plan.", "en", "complaint"),
    Email("promo@lucky-draw.example", "Lucky Draw", "You are our winner!",
          "Claim your prize now: a crypto offer for our lottery winner.", "en", "spam"),
)  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class Post:
    """One webhook ready to send: where, the body and the headers (signed)."""

    source: str
    body: bytes
    headers: dict[str, str]
    label: str


def _standard(source: ResolvedSource, body: bytes, content_type: str) -> dict[str, str]:
    msg_id = f"msg_{uuid.uuid4().hex}"
    now = int(time.time())
    return {
        "content-type": content_type,
        "webhook-id": msg_id,
        "webhook-timestamp": str(now),
        "webhook-signature": sign(source.keys[0], msg_id, now, body),
    }


def _basic(source: ResolvedSource, content_type: str) -> dict[str, str]:
    token = base64.b64encode(f"{source.username}:{source.password}".encode()).decode()
    return {"content-type": content_type, "authorization": f"Basic {token}"}


def _message_id(n: int) -> str:
    return f"<{uuid.uuid4().hex[:16]}.{n}@mail.example.net>"


def postmark(source: ResolvedSource, n: int, e: Email) -> Post:
    body = msgspec.json.encode({
        "FromName": e.name, "From": e.sender,
        "FromFull": {"Email": e.sender, "Name": e.name, "MailboxHash": ""},
        "To": "support@shop.example", "ToFull": [{"Email": "support@shop.example", "Name": ""}],
        "Subject": e.subject, "MessageID": str(uuid.uuid4()),
        "Date": format_datetime(datetime.now(UTC)), "TextBody": e.text,
        "HtmlBody": f"<p>{e.text}</p>",
        "Headers": [{"Name": "Message-ID", "Value": _message_id(n)}], "Attachments": [],
    })  # fmt: skip
    return Post(source.name, body, _basic(source, "application/json"), e.subject)


def mailgun(source: ResolvedSource, n: int, e: Email) -> Post:
    assert source.signing_key is not None
    timestamp = str(int(time.time()))
    token = secrets.token_hex(25)
    signature = hmac.new(source.signing_key, (timestamp + token).encode(), hashlib.sha256)
    fields = {
        "from": f'"{e.name}" <{e.sender}>', "sender": e.sender,
        "recipient": "support@shop.example", "To": "support@shop.example",
        "subject": e.subject, "Subject": e.subject, "body-plain": e.text,
        "stripped-text": e.text, "Message-Id": _message_id(n),
        "Date": format_datetime(datetime.now(UTC)),
        "timestamp": timestamp, "token": token, "signature": signature.hexdigest(),
    }  # fmt: skip
    body = urlencode(fields).encode()
    return Post(source.name, body, {"content-type": "application/x-www-form-urlencoded"},
                e.subject)  # fmt: skip


def sendgrid(source: ResolvedSource, n: int, e: Email) -> Post:
    boundary = f"xYzZY{secrets.token_hex(6)}"
    headers = (f"From: {e.name} <{e.sender}>\nTo: support@shop.example\n"
               f"Subject: {e.subject}\nMessage-ID: {_message_id(n)}\n"
               f"Date: {format_datetime(datetime.now(UTC))}\n")  # fmt: skip
    parts = {
        "headers": headers, "from": f"{e.name} <{e.sender}>", "to": "support@shop.example",
        "subject": e.subject, "text": e.text, "envelope":
        msgspec.json.encode({"to": ["support@shop.example"], "from": e.sender}).decode(),
        "charsets": '{"to":"UTF-8","subject":"UTF-8","from":"UTF-8","text":"UTF-8"}',
    }  # fmt: skip
    chunks = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
        for k, v in parts.items()
    ]
    body = ("".join(chunks) + f"--{boundary}--\r\n").encode()
    return Post(source.name, body, _basic(source, f"multipart/form-data; boundary={boundary}"),
                e.subject)  # fmt: skip


def mime(source: ResolvedSource, n: int, e: Email) -> Post:
    msg = EmailMessage()
    msg["From"] = f"{e.name} <{e.sender}>"
    msg["To"] = "support@shop.example"
    msg["Subject"] = e.subject
    msg["Message-ID"] = make_msgid(domain="mail.example.net")
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg.set_content(e.text)
    body = msg.as_bytes()
    return Post(source.name, body, _standard(source, body, "message/rfc822"), e.subject)


_EMAIL_FORMATS = {"postmark": postmark, "mailgun": mailgun, "sendgrid": sendgrid, "mime": mime}


#: Log positions of the changes this process posts: a Debezium change is deduplicated by
#: its source position, so each post gets one of its own (from the clock: a second
#: demo on the same data does not repeat the first one's).
_positions = itertools.count(time.time_ns() // 1000)


def order_change(source: ResolvedSource, n: int, order: dict[str, Any], before: dict[str, Any],
                 ) -> Post:  # fmt: skip
    """An UPDATE of an ``orders`` row, as Debezium's HTTP sink or a Supabase webhook posts it.

    Each call is a new change, never taken for a redelivery of an earlier one: a fresh
    source position for Debezium (its dedupe key); for Supabase, which sends no id (the
    ingress deduplicates it by its body), the row's ``updated_at``.
    """
    now_ms = int(time.time() * 1000)
    label = f"orders {order['id']}: {before.get('status')} -> {order.get('status')}"
    position = next(_positions)
    order = {**order, "updated_at": datetime.now(UTC).isoformat(timespec="microseconds")}
    if source.config.format == "debezium":
        body = msgspec.json.encode({
            "before": before, "after": order,
            "source": {"version": "2.7.3.Final", "connector": "postgresql", "name": "shop",
                       "ts_ms": now_ms, "snapshot": "false", "db": "shop", "schema": "public",
                       "table": "orders", "txId": position % 2**31, "lsn": position * 8},
            "op": "u", "ts_ms": now_ms,
        })  # fmt: skip
        return Post(source.name, body, _standard(source, body, "application/json"), label)
    body = msgspec.json.encode(
        {
            "type": "UPDATE",
            "table": "orders",
            "schema": "public",
            "record": order,
            "old_record": before,
        }
    )
    return Post(source.name, body, _basic(source, "application/json"), label)


#: Order changes: an ordinary one and two the anomaly agent should flag
#: (a refund larger than the order, a total changed tenfold after payment).
ORDER_CHANGES: tuple[tuple[dict[str, Any], dict[str, Any]], ...] = (
    ({"id": "A-2001", "customer": "klaus.weber@example.de", "status": "shipped",
      "total_cents": 5900, "refunded_cents": 0},
     {"id": "A-2001", "customer": "klaus.weber@example.de", "status": "paid",
      "total_cents": 5900, "refunded_cents": 0}),
    ({"id": "A-1042", "customer": "ada@example.com", "status": "refunded",
      "total_cents": 12900, "refunded_cents": 25800},
     {"id": "A-1042", "customer": "ada@example.com", "status": "paid",
      "total_cents": 12900, "refunded_cents": 0}),
    ({"id": "A-3001", "customer": "amelie.martin@example.fr", "status": "paid",
      "total_cents": 459000, "refunded_cents": 0},
     {"id": "A-3001", "customer": "amelie.martin@example.fr", "status": "paid",
      "total_cents": 45900, "refunded_cents": 0}),
)  # fmt: skip


def sample_posts(sources: dict[str, ResolvedSource], rounds: int = 1) -> list[Post]:
    """The sample stream for the configured ``sources``: every email through the email
    sources in turn, every order change through the change sources in turn, ``rounds``
    times."""
    mail = [s for s in sources.values() if s.config.format in _EMAIL_FORMATS]
    changes = [s for s in sources.values() if s.config.format in ("debezium", "supabase")]
    posts: list[Post] = []
    n = 0
    for _ in range(rounds):
        for e in EMAILS:
            if mail:
                src = mail[n % len(mail)]
                posts.append(_EMAIL_FORMATS[src.config.format](src, n, e))
            n += 1
        for after, before in ORDER_CHANGES:
            if changes:
                posts.append(order_change(changes[n % len(changes)], n, after, before))
            n += 1
    return posts
