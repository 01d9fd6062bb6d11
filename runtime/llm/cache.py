"""The response cache of model steps: an agent's repeated (or nearly repeated) request is
answered with a recorded response instead of a model call.

Opt-in per agent (``cache = Cache(exact=True, semantic=0.92)`` on the class).
The log is the source of truth: every answer the cache gives is a model step
already recorded there (``step.recorded``), and a hit is itself recorded as a
step with ``cached_from`` (the step it repeats) and ``saved`` (what that call
cost), so a retried or replayed activation takes it from the record like any
step and nothing is ever looked up twice.

To keep a lookup cheap the runtime keeps an index beside the log, the table
``response_cache`` (migration 0006): one row per recorded answer of an agent
with a cache, written right after the step is durable. Exact lookups are a
primary-key read by the request's hash (the step's own ``request_hash``: model,
system, messages, tools and every other field). Semantic lookups embed the
messages' text and compare it, by cosine, with the agent's most recent entries
(``Cache.recent``) that share everything else (model, system, tools, options
and the conversation's shape: ``context_hash``); the comparison is brute force
in numpy, since PostgreSQL here has no vector extension. Only conversations of
text alone are matched by meaning, and only by answers that call no tool
(:func:`semantic_request`, :func:`semantic_answer`).

The index is a PostgreSQL table rather than a Redis structure: it points into
the log, lives and is backed up with it, and a lookup needs no second store.
It is not written in the step's transaction (steps of every agent are
group-committed; see ``runtime/log/group.py``): a row lost between the two only
costs a later hit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib.util
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import structlog

from runtime.effects.steps import StepOutput, request_hash
from runtime.events.builtin import StepRecorded
from runtime.events.ids import activation_stream
from runtime.events.model import START
from runtime.events.values import StepRef

if TYPE_CHECKING:
    from runtime.llm.embed import Embedder, Vectors
    from runtime.log.store import EventLog

__all__ = [
    "Cache",
    "CacheIndex",
    "Probe",
    "context_key",
    "exact_key",
    "rebuild_index",
    "request_text",
    "semantic_answer",
    "semantic_request",
]

log = structlog.get_logger(__name__)

_canonical = msgspec.json.Encoder(order="sorted")


@dataclasses.dataclass(frozen=True)
class Cache:
    """An agent's response cache: ``cache = Cache(exact=True, semantic=0.92)``.

    ``exact``: answer a request identical to one answered before (same model,
    system, messages, tools and options). ``semantic``: also answer one whose
    messages mean nearly the same (cosine similarity of their embeddings at
    least this, in (0, 1]) when everything but the messages' text is identical.
    ``embedder``: what makes the embeddings (default: :class:`WordLlamaEmbedder`,
    offline, from the ``semantic`` extra). ``recent``: how many of the agent's
    latest entries a semantic lookup compares with. ``ttl``: seconds an answer is
    given again (None: for ever); an older entry is passed over, and the fresh
    answer to its request replaces it.

    Entries belong to the agent: another agent's calls never answer its requests.
    """

    exact: bool = True
    semantic: float | None = None
    embedder: Embedder | None = None
    recent: int = 1000
    ttl: float | None = None

    def __post_init__(self) -> None:
        if self.semantic is not None:
            if isinstance(self.semantic, bool) or not isinstance(self.semantic, int | float):
                raise TypeError(
                    f"Cache(semantic=) takes a similarity threshold, got {self.semantic!r}"
                )
            if not 0.0 < self.semantic <= 1.0:
                raise ValueError(
                    f"Cache(semantic={self.semantic}): the threshold is a cosine similarity "
                    "in (0, 1] (0.9 to 0.95 is typical)"
                )
        if not self.exact and self.semantic is None:
            raise ValueError("Cache(exact=False) needs a semantic threshold, or it never hits")
        if self.recent < 1:
            raise ValueError(f"Cache(recent={self.recent}) must compare at least one entry")
        if self.ttl is not None and not (math.isfinite(self.ttl) and self.ttl > 0):
            raise ValueError(f"Cache(ttl={self.ttl}) must be a positive number of seconds")
        if self.semantic is not None and self.embedder is None:
            if importlib.util.find_spec("wordllama") is None:
                raise ImportError(
                    "Cache(semantic=...) uses the WordLlama embedder by default: "
                    "pip install 'agentrt[semantic]', or give Cache(embedder=...) your own"
                )
            from runtime.llm.embed import WordLlamaEmbedder

            object.__setattr__(self, "embedder", WordLlamaEmbedder())


class AgentLike(Protocol):
    """What :func:`rebuild_index` reads of an agent (an :class:`runtime.Agent` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def cache(self) -> Cache | None: ...


# -- keys --------------------------------------------------------------------------------


def exact_key(request: Mapping[str, Any]) -> str:
    """The exact cache key: the step's own request hash (the whole request)."""
    return request_hash("llm", request["model"], request)


def _shape(messages: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Roles and block types: a semantic match answers a conversation of the same form
    (a reply to tool results only ever repeats a reply to tool results)."""
    out: list[Any] = []
    for m in messages:
        content = m.get("content")
        kinds = ["text"] if isinstance(content, str) else [b.get("type") for b in content or ()]
        out.append([m.get("role"), kinds])
    return out


def context_key(request: Mapping[str, Any]) -> str:
    """sha256 of everything but the messages' text: what a semantic match must share."""
    rest = {k: v for k, v in request.items() if k != "messages"}
    rest["messages"] = _shape(request.get("messages", ()))
    return hashlib.sha256(_canonical.encode(rest)).hexdigest()


def semantic_request(request: Mapping[str, Any]) -> bool:
    """Whether a request may be answered by one that only means the same: a conversation
    of text alone. Tool calls and results carry data whose exact value is the point
    (``order 42: shipped`` and ``order 43: shipped`` are 0.97 apart to an embedding):
    a conversation holding them is answered from the cache only when identical."""
    for m in request.get("messages", ()):
        content = m.get("content")
        if not isinstance(content, str) and any(b.get("type") != "text" for b in content or ()):
            return False
    return True


def request_text(request: Mapping[str, Any]) -> str:
    """The messages' text, as embedded for a semantic lookup."""
    parts: list[str] = []
    for m in request.get("messages", ()):
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(b.get("text", "") for b in content or () if b.get("type") == "text")
    return "\n".join(p for p in parts if p)


# -- the index ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Probe:
    """One request's keys, computed once for the lookup and the entry written after a miss."""

    agent: str
    request_hash: str
    context_hash: str
    embedder: str | None = None
    vector: Vectors | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Hit:
    """A recorded answer for a request: the step to record instead of calling the model."""

    output: StepOutput
    kind: str
    similarity: float


class CacheIndex:
    """The ``response_cache`` table of one log: lookups and new entries."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        t = f'"{log.schema}".response_cache'
        # $n: the ttl in seconds, NULL for none.
        fresh = "({ttl}::float8 IS NULL OR created_at > now() - make_interval(secs => {ttl}))"
        self._sql_exact = (
            f"SELECT activation_id, step FROM {t} WHERE agent = $1 AND request_hash = $2 "
            f"AND {fresh.format(ttl='$3')}"
        )
        self._sql_near = (
            f"SELECT activation_id, step, embedding FROM {t} WHERE agent = $1 "
            f"AND context_hash = $2 AND embedder = $3 AND {fresh.format(ttl='$5')} "
            "ORDER BY created_at DESC LIMIT $4"
        )
        # A request's entry is its first answer, or the answer after that one expired.
        self._sql_add = (
            f"INSERT INTO {t} AS c (agent, request_hash, context_hash, embedder, embedding, "
            "activation_id, step, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, "
            "coalesce($9, now())) "
            "ON CONFLICT (agent, request_hash) DO UPDATE SET context_hash = excluded.context_hash, "
            "embedder = excluded.embedder, embedding = excluded.embedding, "
            "activation_id = excluded.activation_id, step = excluded.step, created_at = now() "
            f"WHERE NOT {fresh.format(ttl='$8').replace('created_at', 'c.created_at')}"
        )

    async def lookup(
        self, cache: Cache, agent: str, request: Mapping[str, Any]
    ) -> tuple[Probe, Hit | None]:
        """A recorded answer to ``request``: exact first, then the nearest in meaning.

        Also the request's keys (the probe), for the entry written after a miss; the
        embedding is made only when the exact lookup missed."""
        probe = Probe(agent, exact_key(request), context_key(request))
        row = await self.log.pool.fetchrow(self._sql_exact, agent, probe.request_hash, cache.ttl)
        if row is not None:
            hit = await self._hit(StepRef(activation_id=row[0], step=row[1]), "exact", 1.0)
            if hit is not None:
                return probe, hit
        if cache.semantic is None or cache.embedder is None:
            return probe, None
        probe = await self._embedded(cache.embedder, probe, request)
        if probe.vector is None:
            return probe, None
        rows = await self.log.pool.fetch(
            self._sql_near, agent, probe.context_hash, probe.embedder, cache.recent, cache.ttl
        )
        from runtime.llm import embed

        candidates = [embed.from_bytes(r[2]) for r in rows]
        best = embed.best_match(probe.vector, candidates, cache.semantic)
        if best is None:
            return probe, None
        r = rows[best[0]]
        return probe, await self._hit(StepRef(activation_id=r[0], step=r[1]), "semantic", best[1])

    @staticmethod
    async def _embedded(embedder: Embedder, probe: Probe, request: Mapping[str, Any]) -> Probe:
        text = request_text(request)
        if not text.strip() or not semantic_request(request):
            return probe
        raw = await asyncio.to_thread(embedder.embed, [text])
        from runtime.llm.embed import unit_vectors

        [vector] = unit_vectors(raw, 1)
        return dataclasses.replace(probe, embedder=embedder.name, vector=vector)

    async def _hit(self, ref: StepRef, kind: str, similarity: float) -> Hit | None:
        original = await self.answer(ref)
        if original is None:
            return None
        output = StepOutput(
            result=original.result, cached_from=ref, saved=original.usage or original.saved
        )
        return Hit(output, kind, similarity)

    async def answer(self, ref: StepRef) -> StepRecorded | None:
        """The recorded step an entry points at (None if it is not a successful model step)."""
        page = await self.log.read_stream(activation_stream(ref.activation_id), ref.step, limit=1)
        if not page or page[0].stream_version != ref.step:
            return None
        body = page[0].body
        if not isinstance(body, StepRecorded) or body.kind != "llm" or body.error is not None:
            return None
        return body

    async def add(
        self,
        cache: Cache,
        probe: Probe,
        ref: StepRef,
        result: Any,
        *,
        recorded_at: datetime | None = None,
    ) -> None:
        """Index a recorded answer (the first answer to a request stays the one given
        until it expires). ``recorded_at``: when the step was recorded (default now)."""
        vector = None
        if probe.vector is not None and semantic_answer(result):
            vector = embedding_bytes(probe.vector)
        # A rebuild (recorded_at given) never replaces an entry, expired or not.
        ttl = cache.ttl if recorded_at is None else None
        await self.log.pool.execute(
            self._sql_add, probe.agent, probe.request_hash, probe.context_hash,
            probe.embedder if vector is not None else None, vector, ref.activation_id, ref.step,
            ttl, recorded_at,
        )  # fmt: skip

    async def keys(self, cache: Cache, agent: str, request: Mapping[str, Any]) -> Probe:
        """A request's keys and (for a semantic cache) its embedding, without a lookup."""
        probe = Probe(agent, exact_key(request), context_key(request))
        if cache.semantic is None or cache.embedder is None:
            return probe
        return await self._embedded(cache.embedder, probe, request)


def semantic_answer(result: Any) -> bool:
    """Whether an answer may be given to a request that only means the same.

    Not a call of tools: its input is taken from the exact words of the request
    (``look up order 42`` and ``look up order 43`` are near neighbours to an
    embedding, 0.97 apart, but must not run the same tool call). Such an answer is
    still given again to an identical request.
    """
    return isinstance(result, Mapping) and result.get("stop_reason") != "tool_use"


def embedding_bytes(vector: Vectors) -> bytes:
    """A vector as stored in ``response_cache.embedding``: little-endian float32."""
    return vector.astype("<f4").tobytes()


async def rebuild_index(log: EventLog, agents: Sequence[AgentLike]) -> int:
    """Index every answer the log holds for these agents' caches; the number indexed.

    The table is derived from the log: after it was lost, restored from an older
    backup, or for an agent that just turned its cache on, this brings back every
    entry (existing entries are kept; each new one dated when its step was).
    """
    caches = {a.name: a.cache for a in agents if a.cache is not None}
    if not caches:
        return 0
    index = CacheIndex(log)
    added = 0
    after = START
    while True:
        page = await log.read_all(after, 1000)
        for e in page:
            b = e.body
            if (
                isinstance(b, StepRecorded)
                and b.kind == "llm"
                and b.error is None
                and b.cached_from is None
                and (cache := caches.get(b.agent)) is not None
                and isinstance(b.request, Mapping)
            ):
                probe = await index.keys(cache, b.agent, b.request)
                ref = StepRef(activation_id=b.activation_id, step=b.step)
                await index.add(cache, probe, ref, b.result, recorded_at=e.recorded_at)
                added += 1
        if len(page) < 1000:
            return added
        after = page[-1].log_position
