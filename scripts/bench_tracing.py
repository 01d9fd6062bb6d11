"""What tracing costs an activation: ``activate()`` with two steps and an emitted event,
inside its activation span as the worker runs it (``runtime.ops.tracing.span`` with the
parent the stream entry names). In process, no Redis or SQL: the tracing's own cost.

    python scripts/bench_tracing.py [--quick] [--activations 20000] [--baseline CHECKOUT] [--json]

Modes, each in a fresh interpreter (the SDK, once set, stays for its process):

- ``off``: no SDK, entries without a ``traceparent`` (a deployment without tracing);
- ``passthrough``: no SDK, entries with one (the ingress traces, this worker does not:
  the context is carried on, nothing recorded);
- ``on``: the SDK recording every span, exported in batches to an exporter that drops them;
- ``baseline`` (with ``--baseline CHECKOUT``): a checkout from before tracing, no spans.

Figures are the best of five interleaved runs (other load on the machine only slows one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CHILD = "--child"
REPO = Path(__file__).resolve().parent.parent
MODES = ("off", "passthrough", "on")


async def _measure(activations: int, mode: str) -> float:
    """CPU microseconds per activation (this process's, exporter thread included; best of
    five rounds)."""
    from runtime import Agent, Context, Event
    from runtime.agents.context import Trigger
    from runtime.effects.steps import StepOutput, Steps
    from runtime.ops.logconfig import configure_logging
    from runtime.worker.activation import activate

    configure_logging("warning")  # the steps' info lines would be most of what is measured
    tracing: Any = None
    if mode != "baseline":
        from runtime.ops import tracing
    if mode == "on":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        class Drop(SpanExporter):
            def export(self, spans: Sequence[object]) -> SpanExportResult:  # type: ignore[override]
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Drop()))
        trace.set_tracer_provider(provider)

    class Ping(Event, tag="bench.ping"):
        text: str

    class Pong(Event, tag="bench.pong"):
        text: str

    async def answer() -> StepOutput:
        return StepOutput(result={"ok": True})

    class Bench(Agent):
        name = "bench"
        subscribes = (Ping,)

        async def handle(self, event: Ping, ctx: Context) -> None:
            await ctx.steps.run("tool", "lookup", {"q": event.text}, answer)
            await ctx.steps.run("llm", "model", {"q": event.text}, answer)
            ctx.emit(Pong(text=event.text))

    agent = Bench()
    body = Ping(text="hello")
    traceparent = None
    if mode in ("passthrough", "on"):  # as a traced webhook's entry carries it
        traceparent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"

    async def one() -> None:
        event_id = uuid.uuid4()
        trigger = Trigger(event_id=event_id, type="bench.ping", run_id=event_id,
                          causation_id=None, producer="bench", body=body, stream="s",
                          entry_id="0-1")  # fmt: skip
        steps = Steps(None, activation_id=event_id, run_id=event_id, agent="bench",
                      trigger_id=event_id)  # fmt: skip
        span = (
            tracing.span("activation bench", context=tracing.parent_from(traceparent))
            if tracing is not None
            else contextlib.nullcontext()
        )
        with span:
            await activate(agent, trigger, activation_id=event_id, steps=steps,
                           services=None)  # type: ignore[arg-type]  # fmt: skip

    for _ in range(1000):  # warm up
        await one()
    if mode == "on":
        with tracing.span("check") as span:
            assert span.is_recording(), "the SDK is not recording"
    rounds = []
    for _ in range(5):
        started = time.process_time()  # CPU time: other processes' load does not count
        for _ in range(activations):
            await one()
        rounds.append((time.process_time() - started) / activations * 1e6)
    return min(rounds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--activations", type=int, default=None,
                        help="activations per round (default 20000, quick 3000)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument(
        "--baseline", type=Path, help="also measure this checkout of agentrt (one before tracing)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON line of figures")
    parser.add_argument(CHILD, choices=[*MODES, "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.activations is None:
        args.activations = 3000 if args.quick else 20000
    if args.activations < 1:
        parser.error("--activations must be at least 1")
    if args.child:
        # Run as a script: the packages of this repository (or of the baseline) first.
        root = args.baseline if args.child == "baseline" else REPO
        sys.path.insert(0, str(root))
        print(asyncio.run(_measure(args.activations, args.child)))
        return 0
    modes = [*MODES, *(["baseline"] if args.baseline is not None else [])]
    runs: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(2 if args.quick else 5):
        for mode in modes:
            command = [sys.executable, __file__, "--activations", str(args.activations),
                       CHILD, mode]  # fmt: skip
            if args.baseline is not None:
                command += ["--baseline", str(args.baseline)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            runs[mode].append(float(done.stdout))
    best = {mode: round(min(r), 1) for mode, r in runs.items()}
    for mode, value in best.items():
        print(f"CPU per activation, {mode:12} {value:8.1f} us", file=sys.stderr)
    if args.json:
        # The house's figure line; tracing off is the ceiling the other modes are held to
        # (no target: what tracing may cost is a choice, shown, not judged).
        figures = [
            {"name": f"CPU per activation, tracing {mode}", "value": value, "unit": "us",
             "ceiling": None if mode == "off" else best["off"],
             "ratio": None if mode == "off" else round(value / best["off"], 3),
             "target": None}
            for mode, value in best.items()
        ]  # fmt: skip
        print(json.dumps({"figures": figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
