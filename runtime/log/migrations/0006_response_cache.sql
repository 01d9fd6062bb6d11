-- The response cache's index (runtime/llm/cache.py, Agent.cache): which recorded
-- model step answers a request, so a lookup is one indexed read instead of a scan
-- of the log. The log stays the source of truth: a row only points at a
-- step.recorded event (act-<activation_id> at version step), whose result is
-- the cached answer. Written right after that step is durable, for agents with
-- a cache only; a row lost to a crash in between costs one cache hit, nothing
-- else, and every row can be derived again from the log.
CREATE TABLE response_cache (
    agent         text NOT NULL,
    -- The step's request_hash: sha256 of the whole canonical request (model,
    -- system, messages, tools and every other field).
    request_hash  text NOT NULL,
    -- sha256 of the request without its messages' text (model, system, tools,
    -- options and the conversation's shape): semantic matches share it.
    context_hash  text NOT NULL,
    -- Which embedder made `embedding` (vectors of two models never compare);
    -- NULL with the embedding when the agent's cache is exact only.
    embedder      text,
    -- The messages' text embedded, unit length (cosine = dot product), as
    -- little-endian float32 bytes (read straight into numpy: a real[] of 1000
    -- entries takes ten times as long to decode). No vector extension is
    -- assumed: the runtime compares in numpy over the agent's most recent
    -- entries for one context_hash.
    embedding     bytea,
    activation_id uuid NOT NULL,
    step          integer NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent, request_hash)
);
CREATE INDEX response_cache_semantic ON response_cache (agent, context_hash, embedder, created_at DESC);
