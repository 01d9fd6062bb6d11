"""``scripts/bench_e2e.py``: its pure parts, its check of the log against a hand-made log,
and one tiny run of the whole script against the test servers."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from uuid import UUID

import pytest

from runtime.events.builtin import ActivationCompleted
from runtime.events.model import NewEvent
from runtime.log.store import EventLog
from runtime.settings import Settings
from tests.support import REPO
from tests.support.events import Noted
from tests.support.servers import Servers

SCRIPT = str(REPO / "scripts" / "bench_e2e.py")


@pytest.fixture(scope="module")
def bench() -> Iterator[object]:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import bench_e2e

        yield bench_e2e
    finally:
        sys.path.remove(str(REPO / "scripts"))


# -- the pure parts ----------------------------------------------------------------------


def test_an_even_schedule_spaces_the_posts_exactly(bench: object) -> None:
    times = bench.schedule(20.0, 3.0, "even", random.Random(1))  # type: ignore[attr-defined]
    assert len(times) == 60
    assert times[0] == 0.0
    assert times[-1] < 3.0
    assert all(abs((b - a) - 0.05) < 1e-9 for a, b in itertools.pairwise(times))


def test_a_poisson_schedule_has_the_rate_on_average_and_repeats_with_its_seed(
    bench: object,
) -> None:
    times = bench.schedule(100.0, 60.0, "poisson", random.Random(7))  # type: ignore[attr-defined]
    assert times == bench.schedule(100.0, 60.0, "poisson", random.Random(7))  # type: ignore[attr-defined]
    assert times != bench.schedule(100.0, 60.0, "poisson", random.Random(8))  # type: ignore[attr-defined]
    assert times == sorted(times)
    assert times[0] > 0 and times[-1] < 60.0
    assert 5600 < len(times) < 6400  # 6000 expected; the sd of a Poisson count is 77
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) > 0.03 > 0.002 > min(gaps)  # bursts and lulls: not evenly spaced


def test_a_schedule_refuses_what_it_cannot_make(bench: object) -> None:
    with pytest.raises(ValueError, match="positive"):
        bench.schedule(0.0, 5.0, "even", random.Random(1))  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="'even' or 'poisson'"):
        bench.schedule(5.0, 5.0, "bursty", random.Random(1))  # type: ignore[attr-defined]


def test_p99_over_the_bound_is_certain_once_more_than_one_percent_waited(bench: object) -> None:
    certain = bench.certain_miss  # type: ignore[attr-defined]
    # 100 posts: the nearest-rank p99 is the 99th of 100, so 2 over the bound decide it.
    assert not certain(1, 100)
    assert certain(2, 100)
    assert not certain(10, 1000) and certain(11, 1000)
    assert certain(1, 50)  # p99 of 50 is the largest
    assert not certain(0, 0)


def test_refine_tries_the_geometric_mean_when_the_gap_is_worth_it(bench: object) -> None:
    refine = bench.refine  # type: ignore[attr-defined]
    assert refine(80.0, 160.0) == 110.0  # sqrt(12800) = 113.1, two significant digits
    assert refine(5.0, 10.0) == 7.1
    assert refine(None, 5.0) is None  # nothing passed: nothing to refine between
    assert refine(100.0, 120.0) is None  # within 25%


def test_a_growing_backlog_is_told_from_a_steady_one(bench: object) -> None:
    growing = bench.growing  # type: ignore[attr-defined]
    steady = [(float(t), 20 + (t % 3)) for t in range(60)]
    assert not growing(steady, 40.0, 1.0)
    rising = [(float(t), 10 * t) for t in range(60)]
    assert growing(rising, 40.0, 1.0)
    # Doubling but small: below what a p99 under the bound allows at this rate.
    assert not growing([(float(t), 1 + t // 20) for t in range(60)], 40.0, 1.0)
    assert not growing(rising[:4], 40.0, 1.0)  # too few samples to say


def test_judge_counts_lost_unhandled_duplicated_and_unexpected(bench: object) -> None:
    ok, missing, twice, stray, gone = (uuid.uuid4() for _ in range(5))
    facts = bench.LogFacts(  # type: ignore[attr-defined]
        triggers={ok: ("email.received", 1), missing: ("email.received", 1),
                  twice: ("email.received", 2), stray: ("row.changed", 1)},
        inbox={ok: {"triage": 1}, twice: {"triage": 1},
               stray: {"anomalies": 1, "triage": 1}},
        activations={(ok, "triage", ok): 1, (twice, "triage", twice): 2},
    )  # fmt: skip
    routes = {"email.received": ["triage"], "row.changed": ["anomalies"]}
    v = bench.judge([ok, missing, twice, stray, gone], facts, routes)  # type: ignore[attr-defined]
    assert (v.lost, v.unhandled, v.duplicated, v.unexpected) == (1, 1, 2, 1)
    assert not v.clean
    assert "1 lost" in v.text() and "2 duplicated" in v.text()
    clean = bench.judge([ok], facts, routes)  # type: ignore[attr-defined]
    assert clean.clean and clean.text() == ""


def test_ingress_routes_name_the_agents_reading_each_type_from_the_ingress(bench: object) -> None:
    from runtime.agents.loading import load_app

    routes = bench.ingress_routes(load_app("webhooks.demo.agents"))  # type: ignore[attr-defined]
    assert routes == {"email.received": ["triage"], "row.changed": ["anomalies"]}


def test_help() -> None:
    done = subprocess.run(
        [sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    for option in ("--quick", "--json", "--write-readme", "--rates", "--duration", "--workers"):
        assert option in done.stdout


def test_bad_options_get_a_clear_error() -> None:
    done = subprocess.run(
        [sys.executable, SCRIPT, "--rates", "40,10"], capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--rates must be positive and increasing" in done.stderr


# -- the check against a log -------------------------------------------------------------


async def ingress_event(log: EventLog, event_id: UUID) -> None:
    event = NewEvent(body=Noted(text="in"), event_id=event_id, run_id=event_id,
                     producer="ingress:test")  # fmt: skip
    await log.append(f"run-{event_id}", [event])


async def handle(log: EventLog, agent: str, event_id: UUID, *, marked: bool = True) -> None:
    """What a worker's commit leaves: activation.completed and (marked) the inbox row."""
    activation = uuid.uuid4()
    done = NewEvent(
        body=ActivationCompleted(agent=agent, activation_id=activation, trigger_id=event_id,
                                 trigger_type="test.noted", steps=0),
        run_id=event_id, producer=agent,
    )  # fmt: skip
    if marked:
        await log.append_marked(f"run-{event_id}", [done],
                                (agent, event_id, activation, "completed", event_id))  # fmt: skip
    else:
        await log.append(f"run-{event_id}", [done])


async def test_the_log_check_finds_what_a_hand_made_log_lost_and_doubled(
    bench: object, log: EventLog, settings: Settings, admin: object
) -> None:
    routes = {"test.noted": ["triage", "audit"]}
    good, half, lost, stray, doubled, phantom = (uuid.uuid4() for _ in range(6))
    for event_id in (good, half, stray, doubled, phantom):
        await ingress_event(log, event_id)
    for agent in ("triage", "audit"):
        await handle(log, agent, good)
        await handle(log, agent, doubled)
    await handle(log, "triage", half)  # audit never handled it
    await handle(log, "triage", stray)
    await handle(log, "audit", stray)
    await handle(log, "intruder", stray)  # an agent that does not read test.noted
    await handle(log, "triage", doubled, marked=False)  # a second commit of one activation
    await handle(log, "triage", phantom)
    await handle(log, "audit", phantom)

    accepted = [good, half, lost, stray, doubled]
    facts = await bench.log_facts(admin, settings.db_schema, accepted)  # type: ignore[attr-defined]
    assert facts.triggers[good] == ("test.noted", 1)
    assert lost not in facts.triggers
    assert facts.inbox[stray] == {"triage": 1, "audit": 1, "intruder": 1}
    assert facts.activations[(doubled, "triage", doubled)] == 2
    v = bench.judge(accepted, facts, routes)  # type: ignore[attr-defined]
    assert (v.lost, v.unhandled, v.duplicated, v.unexpected) == (1, 1, 1, 1), v.examples
    assert bench.judge([good], facts, routes).clean  # type: ignore[attr-defined]

    # An ingress event no 202 answered is a run started by a duplicate.
    phantoms = bench.phantom_triggers(admin, settings.db_schema, accepted)  # type: ignore[attr-defined]
    assert await phantoms == 1
    everything = [*accepted, phantom]
    assert await bench.phantom_triggers(admin, settings.db_schema, everything) == 0  # type: ignore[attr-defined]
    # Ids the ingress never produced: the check refuses rather than see nothing.
    with pytest.raises(RuntimeError, match="producer"):
        await bench.phantom_triggers(admin, settings.db_schema, [lost])  # type: ignore[attr-defined]


# -- the whole script, tiny --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_tiny_run_gives_its_figures_and_finds_nothing_lost(servers: Servers) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    env.update(REDIS_URL=servers.redis_url, DATABASE_URL=servers.database_url)
    done = subprocess.run(
        [sys.executable, SCRIPT, "--rates", "4", "--duration", "3", "--baseline", "1",
         "--redis-db", "14", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=220, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    figures = {f["name"]: f for f in json.loads(done.stdout.strip().splitlines()[-1])["figures"]}
    assert set(figures) == {
        "ingress alone: accepted webhooks/s (closed loop, 64 in flight, no agents)",
        "p50 POST→terminal at 4/s", "p99 POST→terminal at 4/s", "highest sustained rate",
    }  # fmt: skip
    ingress = figures["ingress alone: accepted webhooks/s (closed loop, 64 in flight, no agents)"]
    assert ingress["value"] > 4, done.stderr[-4000:]
    p50, p99 = figures["p50 POST→terminal at 4/s"], figures["p99 POST→terminal at 4/s"]
    assert 0 < p50["value"] <= p99["value"], done.stderr[-4000:]
    assert p99["target"] == 1000
    headline = figures["highest sustained rate"]
    assert headline["unit"] == "webhooks/s" and headline["ceiling"] == ingress["value"]
    # Every run reached its end and the log holds each exactly once: whatever the
    # latency on a busy machine, nothing was lost, doubled or left unfinished.
    note = headline.get("note", "")
    for bad in ("lost", "duplicated", "not handled", "never seen terminal", "not 202",
                "runs ended", "started twice", "not terminal"):  # fmt: skip
        assert bad not in note, note
    if p99["value"] < 1000:
        assert headline["value"] == 4, note
