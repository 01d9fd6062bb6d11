-- The append-only event log, its guards, and the seals that make whole-stream
-- removal detectable. Runs with search_path set to the agentrt schema, as the
-- owner role.

CREATE TABLE events (
    position        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The writing transaction. Readers order by (tx_id, position) and never
    -- read at or past pg_snapshot_xmin(pg_current_snapshot()): every
    -- transaction below that horizon has ended, so nothing can still appear
    -- behind a reader. A bigserial alone commits out of order.
    tx_id           xid8 NOT NULL DEFAULT pg_current_xact_id(),
    event_id        uuid NOT NULL UNIQUE,
    stream_id       text NOT NULL CHECK (stream_id <> '' AND length(stream_id) <= 200),
    stream_version  bigint NOT NULL CHECK (stream_version >= 1),
    event_type      text NOT NULL,
    schema_version  integer NOT NULL CHECK (schema_version >= 1),
    run_id          uuid,
    causation_id    uuid,
    producer        text,
    recorded_at     timestamptz NOT NULL,
    trace           text,
    -- json (not jsonb) keeps the exact bytes the hash covers, and is still
    -- queryable with ->, ->> and json_* functions.
    data            json NOT NULL,
    prev_hash       bytea NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash            bytea NOT NULL CHECK (octet_length(hash) = 32),
    UNIQUE (stream_id, stream_version)
);

CREATE INDEX events_commit_order ON events (tx_id, position);

-- Seals record, at a safe horizon, the head (version, hash) of every stream
-- that changed since the previous seal, chained seal to seal. A stream whose
-- events were all deleted leaves its sealed head missing: audit verify names it.
CREATE TABLE seals (
    seal_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The seal covers exactly the events with tx_id < upto_tx.
    upto_tx      xid8 NOT NULL,
    from_tx      xid8 NOT NULL,
    event_count  bigint NOT NULL,
    head_count   bigint NOT NULL,
    prev_digest  bytea NOT NULL,
    digest       bytea NOT NULL,
    sealed_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE seal_heads (
    seal_id         bigint NOT NULL REFERENCES seals (seal_id),
    stream_id       text NOT NULL,
    stream_version  bigint NOT NULL,
    hash            bytea NOT NULL,
    PRIMARY KEY (seal_id, stream_id)
);

-- The guards. The runtime's role has no UPDATE, DELETE or TRUNCATE privilege;
-- these triggers refuse the owner too (row-level for UPDATE/DELETE; TRUNCATE
-- skips row triggers, so a statement-level one covers it).
CREATE FUNCTION refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%.% is append-only: % refused', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'AR003',
              HINT = 'agentrt never rewrites the log; append a correcting event instead.';
END
$$;

CREATE TRIGGER events_refuse_update_delete BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER events_refuse_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();
CREATE TRIGGER seals_refuse_update_delete BEFORE UPDATE OR DELETE ON seals
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER seals_refuse_truncate BEFORE TRUNCATE ON seals
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();
CREATE TRIGGER seal_heads_refuse_update_delete BEFORE UPDATE OR DELETE ON seal_heads
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER seal_heads_refuse_truncate BEFORE TRUNCATE ON seal_heads
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();

-- Tail readers LISTEN on agentrt_log_<schema>; every statement that appends
-- wakes them, whichever path it took (the function, a direct INSERT, COPY).
-- A deployment that prefers polling sets agentrt.notify = off (see README:
-- PostgreSQL serialises the commits of transactions that NOTIFY).
CREATE FUNCTION notify_append() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('agentrt.notify', true), '') <> 'off' THEN
        PERFORM pg_notify('agentrt_log_' || TG_TABLE_SCHEMA, '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION notify_append();

-- existing_events: the original rows of a batch whose events are all in the
-- log already (an idempotent re-append), nothing if none is, and SQLSTATE AR002
-- if only some are (a writer bug: a batch is re-appended whole or not at all).
CREATE FUNCTION existing_events(p_ids uuid[])
RETURNS TABLE (r_tx_id xid8, r_first_version bigint, r_positions bigint[], r_inserted boolean,
               r_last_hash bytea)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    present integer;
BEGIN
    SELECT count(*) INTO present FROM events e WHERE e.event_id = ANY (p_ids);
    IF present = 0 THEN
        RETURN;
    ELSIF present < cardinality(p_ids) THEN
        RAISE EXCEPTION 'batch is partly in the log already (% of % events)',
            present, cardinality(p_ids)
            USING ERRCODE = 'AR002',
                  DETAIL = (SELECT e.event_id::text FROM events e
                            WHERE e.event_id = ANY (p_ids) LIMIT 1);
    END IF;
    RETURN QUERY
        SELECT (array_agg(e.tx_id))[1], min(e.stream_version),
               array_agg(e.position ORDER BY u.ord), false,
               (array_agg(e.hash ORDER BY u.ord DESC))[1]
        FROM unnest(p_ids) WITH ORDINALITY AS u(id, ord)
        JOIN events e ON e.event_id = u.id;
END
$$;

-- append_events: one round trip per append, whatever the batch size.
--   * optimistic concurrency: p_expected (NULL = any) must equal the stream's
--     version (SQLSTATE AR001, DETAIL = actual version); two writers racing
--     for the same version meet at the unique (stream_id, stream_version) index;
--   * idempotent on event id: a batch whose events are all in the log already
--     comes back with its original positions (r_inserted = false). The version
--     check finds most re-appends; the rest meet the unique event_id index and
--     the client asks existing_events, so the common path pays no lookup;
--   * links each event's hash to its predecessor in the stream (see
--     runtime/chain.py) inside the writer's own transaction, reading only this
--     stream's head, so streams never wait on each other. A writer that knows
--     the head's hash (a new stream's is all zeroes) sends the chain it
--     computed with p_prev; it is used only if p_prev is the head's hash.
CREATE FUNCTION append_events(
    p_stream   text,
    p_expected bigint,
    p_ids      uuid[],
    p_types    text[],
    p_versions integer[],
    p_runs     uuid[],
    p_causes   uuid[],
    p_producers text[],
    p_recorded timestamptz[],
    p_traces   text[],
    p_data     json[],
    p_content  bytea[],
    p_prev     bytea,
    p_chain    bytea[]
) RETURNS TABLE (r_tx_id xid8, r_first_version bigint, r_positions bigint[], r_inserted boolean,
                 r_last_hash bytea)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    n          integer := cardinality(p_ids);
    head_v     bigint;
    h          bytea;
    stream_b   bytea;
    -- chain[i] is the hash before event i, chain[i + 1] its own.
    chain      bytea[];
    positions  bigint[];
BEGIN
    SELECT e.stream_version, e.hash INTO head_v, h
    FROM events e WHERE e.stream_id = p_stream
    ORDER BY e.stream_version DESC LIMIT 1;
    IF NOT FOUND THEN
        head_v := 0;
        h := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
    END IF;
    IF p_expected IS NOT NULL AND p_expected <> head_v THEN
        RETURN QUERY SELECT * FROM existing_events(p_ids);
        IF FOUND THEN
            RETURN;
        END IF;
        RAISE EXCEPTION 'stream % is at version %, expected %', p_stream, head_v, p_expected
            USING ERRCODE = 'AR001', DETAIL = head_v::text;
    END IF;

    IF p_prev IS NOT NULL AND p_prev = h AND cardinality(p_chain) = n + 1 THEN
        chain := p_chain;
    ELSE
        stream_b := convert_to(p_stream, 'UTF8');
        chain := ARRAY[h];
        FOR i IN 1 .. n LOOP
            h := sha256(h || int8send(head_v + i) || p_content[i] || stream_b);
            chain[i + 1] := h;
        END LOOP;
    END IF;

    -- Columns the writer left all NULL arrive as NULL arrays: unnest pads them.
    WITH inserted AS (
        INSERT INTO events AS e (
            event_id, stream_id, stream_version, event_type, schema_version, run_id,
            causation_id, producer, recorded_at, trace, data, prev_hash, hash)
        SELECT u.id, p_stream, head_v + u.ord, u.typ, u.ver, u.run, u.cause, u.producer,
               u.recorded, u.trace, u.data, u.prev, u.hash
        FROM unnest(p_ids, p_types, p_versions, p_runs, p_causes, p_producers, p_recorded,
                    p_traces, p_data, chain[1:n], chain[2:n + 1])
             WITH ORDINALITY
             AS u(id, typ, ver, run, cause, producer, recorded, trace, data, prev, hash, ord)
        RETURNING e.position, e.stream_version
    )
    SELECT array_agg(i.position ORDER BY i.stream_version) INTO positions FROM inserted i;

    RETURN QUERY SELECT pg_current_xact_id(), head_v + 1, positions, true, chain[n + 1];
END
$$;
