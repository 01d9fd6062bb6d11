-- The agent runtime: the inbox that makes activations exactly-once, and an
-- index to read a run's events.

-- One row per (consumer, source event) whose activation committed. It is
-- inserted in the same transaction as the activation's outputs: a redelivered
-- event whose row exists is acknowledged and skipped, and two workers racing
-- on one event meet at the primary key, so at most one of them commits.
CREATE TABLE inbox (
    consumer        text NOT NULL CHECK (consumer <> '' AND length(consumer) <= 200),
    event_id        uuid NOT NULL,
    activation_id   uuid NOT NULL,
    -- completed | budget_exceeded | dead_lettered
    outcome         text NOT NULL,
    run_id          uuid,
    committed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

CREATE TRIGGER inbox_refuse_update_delete BEFORE UPDATE OR DELETE ON inbox
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER inbox_refuse_truncate BEFORE TRUNCATE ON inbox
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();

-- Budgets, ctx.state and replay read a run's events in log order.
CREATE INDEX events_run ON events (run_id, position) WHERE run_id IS NOT NULL;
