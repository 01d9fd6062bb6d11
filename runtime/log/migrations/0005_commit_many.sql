-- commit_activations: several activations' commits (each its inbox row and its
-- events, appended to its stream with append_events) in ONE transaction and one
-- round trip. Each activation is its own subtransaction: one whose inbox row is
-- there already (a duplicate) or whose append loses a race (another writer took
-- the version, wrote the trigger, or expected another version) is rolled back
-- alone and reported; its neighbours commit. The caller sorts the activations
-- by stream, so two batches lock shared streams in the same order.
--
-- Per activation k (1-based): p_streams[k], p_expected[k] (NULL: any version),
-- p_counts[k] events, and its inbox row (p_consumers[k], p_inbox_ids[k],
-- p_activation_ids[k], p_outcomes[k], p_run_ids[k]). The events of all
-- activations come in order in the flat arrays, as append_events takes them.
-- Returns one row per activation: 'committed' (with its first version, its
-- last hash), 'duplicate' or 'conflict'.
CREATE FUNCTION commit_activations(
    p_streams        text[],
    p_expected       bigint[],
    p_counts         integer[],
    p_consumers      text[],
    p_inbox_ids      uuid[],
    p_activation_ids uuid[],
    p_outcomes       text[],
    p_run_ids        uuid[],
    p_ids            uuid[],
    p_types          text[],
    p_versions       integer[],
    p_runs           uuid[],
    p_causes         uuid[],
    p_producers      text[],
    p_recorded       timestamptz[],
    p_traces         text[],
    p_data           json[],
    p_content        bytea[]
) RETURNS TABLE (r_index integer, r_outcome text, r_first_version bigint, r_last_hash bytea)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    lo         integer := 1;
    hi         integer;
    appended   record;
    violated   text;
BEGIN
    FOR k IN 1 .. cardinality(p_streams) LOOP
        hi := lo + p_counts[k] - 1;
        BEGIN
            INSERT INTO inbox (consumer, event_id, activation_id, outcome, run_id)
            VALUES (p_consumers[k], p_inbox_ids[k], p_activation_ids[k], p_outcomes[k],
                    p_run_ids[k]);
            SELECT * INTO appended FROM append_events(
                p_streams[k], p_expected[k], p_ids[lo:hi], p_types[lo:hi], p_versions[lo:hi],
                p_runs[lo:hi], p_causes[lo:hi], p_producers[lo:hi], p_recorded[lo:hi],
                p_traces[lo:hi], p_data[lo:hi], p_content[lo:hi], NULL, NULL);
            IF NOT appended.r_inserted THEN
                -- Its events are in the log already, without its inbox row: not
                -- a commit this batch may make; the caller's single path decides.
                RAISE EXCEPTION 'events of activation % present', k USING ERRCODE = 'AR002';
            END IF;
            r_index := k;
            r_outcome := 'committed';
            r_first_version := appended.r_first_version;
            r_last_hash := appended.r_last_hash;
            RETURN NEXT;
        EXCEPTION
            WHEN unique_violation THEN
                GET STACKED DIAGNOSTICS violated = CONSTRAINT_NAME;
                r_index := k;
                r_outcome := CASE WHEN violated = 'inbox_pkey' THEN 'duplicate' ELSE 'conflict' END;
                r_first_version := NULL;
                r_last_hash := NULL;
                RETURN NEXT;
            WHEN SQLSTATE 'AR001' OR SQLSTATE 'AR002' OR deadlock_detected THEN
                r_index := k;
                r_outcome := 'conflict';
                r_first_version := NULL;
                r_last_hash := NULL;
                RETURN NEXT;
        END;
        lo := hi + 1;
    END LOOP;
END
$$;
