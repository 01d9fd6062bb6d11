"""Activation claims: one worker at a time runs the steps of (agent, trigger event).

Two copies of one event can sit in an agent's streams (a relay republish, a
redrive, a change of partitions, a second relay during a deploy), and two
workers can read them at the same moment. The inbox lets only one of them
commit, but without a claim both would call the tool. So before an
activation executes its first step (or, for a redelivery, before it reads
its record), it takes a claim: a Redis key ``SET NX PX`` with a token of its
own. A second copy finds the key held and waits for it to go (released at
commit, or expired when its worker died), then reads the record the first
one left, so its steps come back from the log instead of being called.

The claim is a lease: the worker renews it with the entries it holds, and
before each step it executes it checks that the lease is still valid by its
own clock (``valid_until``: the time it sent the last successful renewal plus
the lease, minus a margin), asking Redis only when that is near. A worker
that stalled past its lease and lost the claim raises :class:`ClaimLost`
instead of calling.

Activations that take no step never claim: their only effect is their commit,
which the inbox already makes exactly-once (and that is the fast path).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from uuid import UUID

import redis.asyncio as aioredis
import structlog
from redis.crc import key_slot
from redis.exceptions import RedisError

from runtime.errors import ClaimLost
from runtime.log.group import Batcher
from runtime.streams.keys import KEY_PREFIX, is_cluster, slot_groups

log = structlog.get_logger(__name__)

# Keys held with a token: activation claims here, the relay's lease too.
# KEYS: the keys. ARGV: ttl ms, then one token per key. Extend the keys whose
# token is ours; returns the 1-based indexes of those we no longer hold.
RENEW_HELD = """
local lost = {}
for i = 1, #KEYS do
    if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
        redis.call('PEXPIRE', KEYS[i], ARGV[1])
    else
        table.insert(lost, i)
    end
end
return lost
"""

# KEYS: the keys. ARGV: one token per key. Delete only the keys we hold (a GET
# then a DEL could delete a key another holder took in between); how many.
RELEASE_HELD = """
local n = 0
for i = 1, #KEYS do
    if redis.call('GET', KEYS[i]) == ARGV[i] then
        n = n + redis.call('DEL', KEYS[i])
    end
end
return n
"""

#: First and longest pause between looks at a claim another worker holds.
_POLL_FIRST = 0.02
_POLL_MAX = 0.25


def claim_key(agent: str, trigger_id: UUID) -> str:
    """``agentrt:claim:{triage}:<event id>`` (the agent's hash tag, like its stream)."""
    return f"{KEY_PREFIX}claim:{{{agent}}}:{trigger_id}"


class Claim:
    """One activation's claim on (agent, trigger event); see the module doc."""

    def __init__(self, claims: Claims, agent: str, trigger_id: UUID) -> None:
        self._claims = claims
        self.key = claim_key(agent, trigger_id)
        self.token = uuid.uuid4().hex
        #: Monotonic time until which the claim is ours without asking Redis (0: not held).
        self.valid_until = 0.0
        #: Whether acquiring it meant waiting for another holder to let go.
        self.waited = False

    @property
    def held(self) -> bool:
        return self.valid_until > 0

    async def acquire(self) -> bool:
        """Take the claim, waiting while another worker holds it; True if we had to wait.

        The wait is bounded by the holder's lease: a dead holder's key expires.
        """
        delay = _POLL_FIRST
        while True:
            sent = time.monotonic()
            if await self._claims.take(self.key, self.token):
                self._claims.held[self.key] = self
                self.valid_until = sent + self._claims.valid_for
                return self.waited
            if not self.waited:
                self.waited = True
                log.info("activation.claim_wait", key=self.key)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)

    async def confirm(self) -> bool:
        """Before executing a step: the claim is still ours (False), or was taken again
        after it lapsed (True: the caller checks that nobody recorded a step meanwhile),
        or :class:`ClaimLost` when another worker holds it."""
        now = time.monotonic()
        if now < self.valid_until:
            return False
        # The renewals stopped (Redis slow, the loop starved): ask.
        if self.held and not await self._claims.renew([self]):
            return False
        # Lapsed: its key expired (nobody renewed it in time) or is another's.
        sent = time.monotonic()
        if not await self._claims.take(self.key, self.token):
            raise ClaimLost(f"{self.key}: another worker took the activation over")
        self._claims.held[self.key] = self
        self.valid_until = sent + self._claims.valid_for
        log.warning("activation.claim_retaken", key=self.key)
        return True

    # -- as the guard of the activation's steps (runtime.effects.steps.StepGuard) --

    async def before_load(self) -> None:
        if not self.held:
            await self.acquire()

    async def before_execute(self) -> bool:
        return await self.confirm()

    def release_later(self) -> None:
        """Hand the claim to the next batched release (after the commit)."""
        if self.held:
            self.valid_until = 0.0
            self._claims.held.pop(self.key, None)
            self._claims.releasing.append((self.key, self.token))

    async def release(self) -> None:
        """Let go now (a failed or cancelled activation: a retry need not wait)."""
        if self.held:
            self.valid_until = 0.0
            self._claims.held.pop(self.key, None)
            await self._claims.release_now([(self.key, self.token)])


class Claims:
    """The claims one worker holds: renewed together, released in batches."""

    def __init__(self, redis: aioredis.Redis, ttl: float) -> None:
        self.redis = redis
        self.ttl_ms = max(int(ttl * 1000), 100)
        #: How long a claim counts as ours after a renewal was sent (a margin
        #: of a tenth of the lease for clock drift and the reply's trip).
        self.valid_for = self.ttl_ms / 1000 * 0.9
        #: key -> the claim held on it.
        self.held: dict[str, Claim] = {}
        #: (key, token) released by committed activations, for the next ack flush.
        self.releasing: list[tuple[str, str]] = []
        self._renew = redis.register_script(RENEW_HELD)
        self._release = redis.register_script(RELEASE_HELD)
        self._takes = _Takes(redis, self.ttl_ms)

    async def take(self, key: str, token: str) -> bool:
        """``SET key token NX PX ttl``: True if the key is now ours.

        The takes of activations starting at the same moment share one
        pipelined round trip (one per loop turn while one is in flight), as
        their step records share a flush.
        """
        return await self._takes.take(key, token)

    def claim(self, agent: str, trigger_id: UUID) -> Claim:
        return Claim(self, agent, trigger_id)

    async def renew(self, claims: list[Claim] | None = None) -> list[Claim]:
        """Extend ``claims`` (default: all held); those lost are dropped and returned."""
        batch = list(self.held.values()) if claims is None else claims
        if not batch:
            return []
        sent = time.monotonic()
        by_key = {c.key: c for c in batch}
        lost_keys: set[str] = set()
        # One script per hash slot on a Redis Cluster (a claim key carries its
        # agent's tag): a script may only touch keys of one slot.
        for keys in slot_groups(self.redis, by_key):
            reply = await self._renew(
                keys=keys, args=[self.ttl_ms, *(by_key[k].token for k in keys)]
            )
            lost_keys.update(keys[int(i) - 1] for i in reply or ())
        lost = []
        for c in batch:
            if c.key in lost_keys:
                c.valid_until = 0.0
                self.held.pop(c.key, None)
                lost.append(c)
                log.warning("activation.claim_lost", key=c.key)
            elif c.held:
                c.valid_until = sent + self.valid_for
        return lost

    async def release_in(self, pipe: aioredis.client.Pipeline) -> int:
        """Queue the pending releases on ``pipe`` (the acknowledgement round trip).

        Not on a Redis Cluster, whose pipelines take no scripts: there the
        caller runs :meth:`release_pending` after the pipeline."""
        batch, self.releasing = self.releasing, []
        if batch:
            await self._release(keys=[k for k, _ in batch], args=[t for _, t in batch],
                                client=pipe)  # fmt: skip
        return len(batch)

    async def release_pending(self) -> int:
        """Release the pending claims now (a round trip per hash slot on a cluster)."""
        batch, self.releasing = self.releasing, []
        if batch:
            await self.release_now(batch)
        return len(batch)

    async def release_now(self, batch: list[tuple[str, str]]) -> None:
        cluster = is_cluster(self.redis)
        by_slot: dict[int, list[tuple[str, str]]] = {}
        for key, token in batch:  # one script per hash slot on a cluster
            by_slot.setdefault(key_slot(key.encode()) if cluster else 0, []).append((key, token))
        for pairs in by_slot.values():
            await self._release(keys=[k for k, _ in pairs], args=[t for _, t in pairs])


@dataclasses.dataclass(slots=True)
class _Take:
    key: str
    token: str
    done: asyncio.Future[bool]


class _Takes(Batcher[_Take]):
    """The ``SET NX PX`` of claims taken at the same moment, in one pipeline."""

    #: A failed round trip fails every take in it (none is tried again alone).
    lost = (RedisError, OSError)

    def __init__(self, redis: aioredis.Redis, ttl_ms: int) -> None:
        super().__init__(max_batch=1024, max_waiting=1 << 20)
        self._redis, self._ttl_ms = redis, ttl_ms

    async def take(self, key: str, token: str) -> bool:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        taken: bool = await self._submit(_Take(key, token, done))
        return taken

    async def _write(self, batch: list[_Take]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for t in batch:
                pipe.set(t.key, t.token, nx=True, px=self._ttl_ms)
            replies = await pipe.execute(raise_on_error=False)
        for t, reply in zip(batch, replies, strict=True):
            if t.done.done():
                continue
            if isinstance(reply, Exception):
                t.done.set_exception(reply)
            else:
                t.done.set_result(bool(reply))
