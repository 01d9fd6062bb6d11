"""``agentrt demo``: the whole pipeline on one machine, from signed webhooks to an audited log.

It starts the ingress (in this process, on a free port), a worker running
:mod:`webhooks.demo.agents` with the relay, posts signed Postmark inbound
webhooks (plus a redelivery and a forged one), waits for the runs to finish,
prints each run as the log holds it, and seals and verifies the log.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from typing import Any
from uuid import UUID

import httpx
import msgspec
import uvicorn
from rich.console import Console
from rich.markup import escape

from runtime import (
    LLM,
    ActivationCompleted,
    EventLog,
    LogQueries,
    Relay,
    Settings,
    StepRecorded,
    Worker,
    WorkerOptions,
    audit_seal,
    audit_verify,
    causation_order,
    connect_database,
    connect_redis,
    model_client,
)
from webhooks.app import create_app
from webhooks.auth import decode_secret, sign
from webhooks.config import WebhooksConfig, resolve
from webhooks.demo.agents import agents
from webhooks.events import EmailReceived

#: For this local demo only.
SECRET = "whsec_" + base64.b64encode(b"agentrt demo secret, local use only").decode()
PARTITIONS = 4

EMAILS = [
    ("ada@example.com", "Ada Lovelace", "Invoice 1042 charged twice?",
     "Hi, my card was charged twice for invoice 1042. Could you refund one payment?"),
    ("grace@example.com", "Grace Hopper", "Login broken after password reset",
     "Since I reset my password the login page shows an error. Please help."),
    ("promo@lucky-draw.example", "Lucky Draw", "You are our winner!",
     "Claim your prize now: a crypto offer for our lottery winner."),
]  # fmt: skip


def postmark(n: int, sender: str, name: str, subject: str, text: str) -> bytes:
    """A Postmark inbound webhook body, as Postmark posts it."""
    return msgspec.json.encode(
        {
            "FromName": name,
            "From": sender,
            "FromFull": {"Email": sender, "Name": name, "MailboxHash": ""},
            "To": "support@agentrt.example",
            "ToFull": [{"Email": "support@agentrt.example", "Name": "", "MailboxHash": ""}],
            "Subject": subject,
            "MessageID": f"demo-{n}-{int(time.time() * 1000)}",
            "Date": "Sun, 29 Nov 2026 10:00:00 +0000",
            "TextBody": text,
            "HtmlBody": f"<p>{text}</p>",
            "Headers": [],
            "Attachments": [],
        }
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _headers(msg_id: str, body: bytes) -> dict[str, str]:
    now = int(time.time())
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(now),
        "webhook-signature": sign(decode_secret(SECRET), msg_id, now, body),
    }


async def run_demo(settings: Settings, log: EventLog, out: Console) -> bool:
    """The demo; True when every run finished and the audit passed."""
    config = msgspec.convert(
        {
            "ingress": {"partitions": PARTITIONS},
            "sources": {"support": {"format": "postmark", "auth": "standard",
                                    "secrets": [SECRET]}},
        },
        WebhooksConfig,
    )  # fmt: skip
    app = create_app(settings, config, resolve(config, "demo"))
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    redis = await connect_redis(settings.require_redis_url())
    stop = asyncio.Event()
    async with model_client(settings) as mc:
        llm = LLM(mc.client, settings, offline=mc.offline)
        worker = Worker(agents, redis=redis, log=log, llm=llm,
                        options=WorkerOptions(partitions=PARTITIONS, claim_idle=10))  # fmt: skip
        tasks = [
            asyncio.create_task(server.serve()),
            asyncio.create_task(worker.run(stop)),
            asyncio.create_task(Relay(log, redis, agents, poll_interval=0.1).serve(stop)),
        ]
        try:
            while not server.started:
                if tasks[0].done():
                    tasks[0].result()
                await asyncio.sleep(0.02)
            model = "offline model" if mc.offline else "Anthropic API"
            out.print(f"[bold]ingress[/] on http://127.0.0.1:{port}, [bold]worker[/] "
                      f"{worker.consumer} (triage + responder, {model}), relay\n")  # fmt: skip
            run_ids = await _post(port, out)
            ok = await _wait(log, run_ids, out)
            for run_id in run_ids:
                _print_run(await log.read_run(run_id), out)
            await _summary(log, run_ids, out, offline=mc.offline)
        finally:
            stop.set()
            server.should_exit = True
            await asyncio.gather(*tasks, return_exceptions=True)
            await redis.aclose()
    return ok and await _audit(settings, log, out)


async def _post(port: int, out: Console) -> list[UUID]:
    run_ids = []
    url = f"http://127.0.0.1:{port}/webhooks/support"
    async with httpx.AsyncClient(timeout=10) as client:
        first: tuple[str, bytes] | None = None
        for n, (sender, name, subject, text) in enumerate(EMAILS, start=1):
            body = postmark(n, sender, name, subject, text)
            msg_id = f"msg_demo_{n}_{time.time_ns()}"
            first = first or (msg_id, body)
            r = await client.post(url, content=body, headers=_headers(msg_id, body))
            answer = r.json()
            out.print(f"POST /webhooks/support  {escape(subject)!r:44} -> {r.status_code} "
                      f"event {answer.get('event_id')}")  # fmt: skip
            run_ids.append(UUID(answer["event_id"]))
        assert first is not None
        r = await client.post(url, content=first[1], headers=_headers(*first))
        again = r.json()
        out.print(f"POST (the same delivery again)                        -> {r.status_code} "
                  f"event {again.get('event_id')} duplicate={again.get('duplicate')}")  # fmt: skip
        forged = _headers(first[0], first[1]) | {"webhook-signature": "v1,Zm9yZ2Vk"}
        r = await client.post(url, content=first[1], headers=forged)
        out.print(f"POST (forged signature)                               -> {r.status_code} "
                  f"{escape(str(r.json().get('code', '')))}")  # fmt: skip
    return run_ids


async def _wait(log: EventLog, run_ids: list[UUID], out: Console) -> bool:
    """Until triage and responder completed for every run (30 s at most)."""
    queries = LogQueries(log)
    deadline = time.monotonic() + 30
    with out.status("agents at work..."):
        while time.monotonic() < deadline:
            done = await queries.activations_handled(run_ids)
            if done >= 2 * len(run_ids):
                return True
            await asyncio.sleep(0.1)
    out.print("[red]the runs did not finish within 30 s[/]")
    return False


def _print_run(events: list[Any], out: Console) -> None:
    """One line per event, each trigger before what it caused (its steps, emitted events
    and completion), indented by causation; ``#`` is the log position (the steps of an
    activation are in the log before the trigger it commits). ``agentrt runs show`` draws
    the same tree with durations and costs; ``agentrt log tail`` shows events whole."""
    out.print(f"\n[bold]run {events[0].run_id if events else '?'}[/]")
    rows = [(e.event_id, e.causation_id) for e in events]
    for i, depth, _ in causation_order(rows, id_at=0, cause_at=1):
        e = events[i]
        indent = "  " * depth
        out.print(f"  #{e.position:<5} {indent}{e.event_type:{max(24 - len(indent), 1)}} "
                  f"{e.producer or '':18} {escape(_gist(e.body))}")  # fmt: skip


def _gist(body: Any) -> str:
    if isinstance(body, StepRecorded):
        result = body.result
        if body.kind == "llm" and isinstance(result, dict):
            text = " ".join(b.get("text", "") for b in result.get("content", []))
            tokens = body.usage.tokens if body.usage else 0
            return f"step {body.step}: {body.name} -> {text.strip()[:60]!r} ({tokens} tokens)"
        return f"step {body.step}: {body.name}({_short(body.request)}) -> {_short(result)}"
    if isinstance(body, ActivationCompleted):
        return f"{body.agent}: {body.steps} steps, {len(body.emitted)} emitted, {body.outcome}"
    if isinstance(body, EmailReceived):
        return f"from {body.sender.email}: {body.subject!r}"
    fields = msgspec.to_builtins(body)
    fields.pop("type", None)
    return _short(fields)


def _short(value: Any, limit: int = 70) -> str:
    text = msgspec.json.encode(value).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def _summary(log: EventLog, run_ids: list[UUID], out: Console, *, offline: bool) -> None:
    summary = await LogQueries(log).run_summary(run_ids)
    steps, tokens, activations = summary.steps, summary.tokens, summary.activations
    mark = " (offline model: estimated tokens, cost 0)" if offline else ""
    out.print(f"\n{len(run_ids)} runs, {activations} activations, {steps} durable steps, "
              f"{tokens} tokens{mark}")  # fmt: skip


async def _audit(settings: Settings, log: EventLog, out: Console) -> bool:
    async with log.pool.acquire() as conn:
        sealed = await audit_seal(conn, settings.db_schema)
    owner = await connect_database(settings.require_database_url())
    try:
        report = await audit_verify(owner, settings.db_schema)
    finally:
        await owner.close()
    if sealed:
        out.print(f"sealed: seal {sealed.seal_id} over {sealed.event_count} events")
    verdict = "[green]ok[/]" if report.ok else f"[red]FAILED[/]: {escape(str(report.first))}"
    out.print(f"audit verify: {verdict} ({report.events} events, {report.streams} streams)")
    return bool(report.ok)
