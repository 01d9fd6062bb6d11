"""What ``webhooks`` adds to ``agentrt up`` (entry point of the ``agentrt.services`` group):
the ingress, the sample application as the default app, and the demo's webhooks."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import httpx
from rich.console import Console
from rich.markup import escape

from webhooks.config import load
from webhooks.demo.traffic import describe, sample_config, sample_posts

if TYPE_CHECKING:
    from pathlib import Path

    from runtime.cli.up import Service, UpPlan
    from runtime.settings import Settings

#: ``--app`` when none is given: the support desk.
default_app = "webhooks.demo.agents"


def config_path(plan: UpPlan) -> Path:
    """The sources file: the configured one when it exists, else one made for the sample
    application in the state directory (fresh secrets, kept for the next start)."""
    configured = plan.settings.webhooks_config
    if configured.exists():
        return configured
    return sample_config(made_config(plan.settings))


def made_config(settings: Settings) -> Path:
    """Where ``agentrt up`` keeps the sources file it made (``<state dir>/webhooks.toml``)."""
    return settings.state_dir / "webhooks.toml"


def services(plan: UpPlan) -> list[Service]:
    from runtime.cli.up import Service

    path = config_path(plan)
    _, sources = load(path)
    url = plan.url(0)
    about = [f"ingress  {url} (sources from {path}):"]
    about += [f"  POST {url}/webhooks/{name}  {describe(s)}" for name, s in sources.items()]
    return [
        Service(
            "ingress",
            ["serve", "--host", plan.host, "--port", str(plan.port), "--config", str(path)],
            health=f"{url}/readyz",
            about=about,
        )
    ]


async def status(plan: UpPlan) -> dict[str, str]:
    """Webhooks accepted (and refused) so far, from the ingress's own metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(timeout=2) as client:
        text = (await client.get(f"{plan.url(0)}/metrics")).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "agentrt_webhook_requests":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    outcome = sample.labels.get("outcome", "")
                    counts[outcome] = counts.get(outcome, 0) + sample.value
    accepted = int(counts.pop("accepted", 0))
    refused = int(sum(counts.values()))
    return {"webhooks in": f"{accepted:,}" + (f" (+{refused:,} duplicate/refused)" if refused
                                             else "")}  # fmt: skip


async def feed(plan: UpPlan, console: Console) -> int:
    """Post the sample webhooks (every email kind and language, order changes); the number
    accepted (each starts a run)."""
    _, sources = load(config_path(plan))
    posts = sample_posts(sources)
    accepted = 0
    async with httpx.AsyncClient(base_url=plan.url(0), timeout=30) as client:
        for post in posts:
            r = await client.post(f"/webhooks/{post.source}", content=post.body,
                                  headers=post.headers)  # fmt: skip
            fresh = r.status_code == 202 and not r.json().get("duplicate")
            accepted += fresh
            mark = "[green]" if fresh else "[red]"
            console.print(f"POST /webhooks/{post.source:9} {escape(post.label)[:52]:52} "
                          f"-> {mark}{r.status_code}[/]")  # fmt: skip
            await asyncio.sleep(0)
        signed = next((p for p in posts if "webhook-id" in p.headers), None)
        if signed is not None:
            # The promises on the wire: a redelivery is deduplicated, a forgery refused.
            r = await client.post(f"/webhooks/{signed.source}", content=signed.body,
                                  headers=signed.headers)  # fmt: skip
            console.print(f"POST /webhooks/{signed.source:9} {'(the same delivery again)':52} "
                          f"-> {r.status_code} duplicate={r.json().get('duplicate')}")  # fmt: skip
            forged = signed.headers | {"webhook-signature": "v1,Zm9yZ2VkIHNpZ25hdHVyZQ=="}
            r = await client.post(f"/webhooks/{signed.source}", content=signed.body,
                                  headers=forged)  # fmt: skip
            code = escape(str(r.json().get("code", "")))
            console.print(f"POST /webhooks/{signed.source:9} {'(a forged signature)':52} "
                          f"-> {r.status_code} {code}")  # fmt: skip
    return accepted
