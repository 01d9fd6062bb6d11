-- Promise 6, closed at the edges (issue 9): guards that fire in every session
-- mode, seals that cannot fork and that commit the log's order.
-- The runtime role's privileges (INSERT on every column of events except
-- tx_id and position, none on seals, seal_heads or schema_migrations) are set
-- by the migration runner after every migrate (runtime/log/migrations).

-- The guards fire in every session mode: an ordinary trigger (tgenabled 'O')
-- is skipped under session_replication_role = replica, which a superuser can
-- set for a session. `agentrt db status` reports any guard not at 'A'.
ALTER TABLE events ENABLE ALWAYS TRIGGER events_refuse_update_delete;
ALTER TABLE events ENABLE ALWAYS TRIGGER events_refuse_truncate;
ALTER TABLE seals ENABLE ALWAYS TRIGGER seals_refuse_update_delete;
ALTER TABLE seals ENABLE ALWAYS TRIGGER seals_refuse_truncate;
ALTER TABLE seal_heads ENABLE ALWAYS TRIGGER seal_heads_refuse_update_delete;
ALTER TABLE seal_heads ENABLE ALWAYS TRIGGER seal_heads_refuse_truncate;
ALTER TABLE inbox ENABLE ALWAYS TRIGGER inbox_refuse_update_delete;
ALTER TABLE inbox ENABLE ALWAYS TRIGGER inbox_refuse_truncate;

-- A seal has at most one successor: two seals sharing a predecessor (which
-- concurrent sealers used to write) would fork the chain for good.
DO $$
DECLARE
    fork bigint[];
BEGIN
    SELECT array_agg(s.seal_id ORDER BY s.seal_id) INTO fork
    FROM seals s GROUP BY s.prev_digest HAVING count(*) > 1 LIMIT 1;
    IF fork IS NOT NULL THEN
        RAISE EXCEPTION 'the seal chain forked before this migration: seals % share one predecessor', fork
            USING HINT = 'Concurrent `agentrt audit seal` runs wrote sibling seals; `agentrt audit '
                         'verify` reports it. Keep the first sibling: as a superuser, with the seals '
                         'guards disabled, delete the later siblings and every seal after them '
                         '(their seal_heads rows first), migrate again, then seal.';
    END IF;
END
$$;
ALTER TABLE seals ADD CONSTRAINT seals_one_successor UNIQUE (prev_digest);

-- Seal format 2 also commits the commit order of the events it covers:
-- order_digest hashes (tx_id, position, event_id) of every event with
-- from_tx <= tx_id < upto_tx in (tx_id, position) order, and the seal's digest
-- covers it (see runtime/log/chain.py). Format 1 seals (before this
-- migration) cover the stream heads only.
ALTER TABLE seals ADD COLUMN format smallint NOT NULL DEFAULT 1 CHECK (format IN (1, 2)),
                  ADD COLUMN order_digest bytea CHECK (octet_length(order_digest) = 32);

-- seal_log: record a seal of the events below the oldest running transaction
-- that arrived since the last seal. It runs as the owner (SECURITY DEFINER),
-- so a role may seal without any privilege on the seal tables: it can only
-- ever record what the log holds. Mirrors chain.seal_digest and
-- chain.OrderDigest (audit verify recomputes both in Python).
--
-- Concurrency: the lock is taken before anything is read, and under READ
-- COMMITTED every later statement takes a fresh snapshot, so a sealer that
-- waited for the lock sees the seal its predecessor committed. Under
-- REPEATABLE READ the snapshot would predate the lock: refused. The unique
-- prev_digest is the backstop.
CREATE FUNCTION seal_log()
RETURNS TABLE (r_seal_id bigint, r_upto_tx xid8, r_event_count bigint, r_head_count bigint,
               r_digest bytea)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
DECLARE
    horizon     xid8;
    from_tx     xid8;
    last_count  bigint;
    prev        bytea;
    head_n      bigint;
    heads_d     bytea;
    added       bigint;
    order_d     bytea;
    new_digest  bytea;
    new_id      bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'seal_log() must run under READ COMMITTED, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'AR004',
                  HINT = 'its snapshot must be taken after the seal lock is granted';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('agentrt.seal.' || current_schema()));

    horizon := pg_snapshot_xmin(pg_current_snapshot());
    SELECT s.upto_tx, s.event_count, s.digest INTO from_tx, last_count, prev
    FROM seals s ORDER BY s.seal_id DESC LIMIT 1;
    IF NOT FOUND THEN
        from_tx := '0'::xid8;
        last_count := 0;
        prev := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
    END IF;
    IF horizon <= from_tx THEN
        RETURN;
    END IF;

    -- heads_digest: sha256(prev || for each head, by stream id in code point
    -- order: int4(len) || utf8(stream id) || int8(version) || hash).
    SELECT count(*),
           sha256(prev || coalesce(string_agg(
               int4send(octet_length(h.sb)) || h.sb || int8send(h.stream_version) || h.hash,
               ''::bytea ORDER BY h.sb), ''::bytea))
    INTO head_n, heads_d
    FROM (SELECT DISTINCT ON (e.stream_id) convert_to(e.stream_id, 'UTF8') AS sb,
                 e.stream_version, e.hash
          FROM events e WHERE e.tx_id >= from_tx AND e.tx_id < horizon
          ORDER BY e.stream_id, e.stream_version DESC) h;
    IF head_n = 0 THEN
        RETURN;
    END IF;

    -- OrderDigest: sha256 of the sha256 of each run of 65536 rows
    -- int8(tx_id) || int8(position) || event id (16 bytes), in (tx_id, position) order.
    SELECT coalesce(sum(c.n), 0),
           sha256(coalesce(string_agg(c.d, ''::bytea ORDER BY c.chunk), ''::bytea))
    INTO added, order_d
    FROM (SELECT o.chunk, count(*) AS n, sha256(string_agg(o.b, ''::bytea ORDER BY o.rn)) AS d
          FROM (SELECT r.rn, (r.rn - 1) / 65536 AS chunk, r.b
                FROM (SELECT row_number() OVER (ORDER BY e.tx_id, e.position) AS rn,
                             int8send(e.tx_id::text::bigint) || int8send(e.position) || uuid_send(e.event_id) AS b
                      FROM events e WHERE e.tx_id >= from_tx AND e.tx_id < horizon) r) o
          GROUP BY o.chunk) c;

    new_digest := sha256(heads_d || order_d);
    INSERT INTO seals (upto_tx, from_tx, event_count, head_count, prev_digest, digest, format,
                       order_digest)
    VALUES (horizon, from_tx, last_count + added, head_n, prev, new_digest, 2, order_d)
    RETURNING seal_id INTO new_id;
    INSERT INTO seal_heads (seal_id, stream_id, stream_version, hash)
    SELECT DISTINCT ON (e.stream_id) new_id, e.stream_id, e.stream_version, e.hash
    FROM events e WHERE e.tx_id >= from_tx AND e.tx_id < horizon
    ORDER BY e.stream_id, e.stream_version DESC;

    RETURN QUERY SELECT new_id, horizon, last_count + added, head_n, new_digest;
END
$$;

-- Only the roles the migration runner grants it to may seal.
REVOKE EXECUTE ON FUNCTION seal_log() FROM PUBLIC;
