-- Snapshots of runs' folded agent state (Agent.evolve), every N events of a
-- run: ctx.state, time travel and replay load the nearest one and fold only
-- the events after it. A cache, keyed by the fold's version: never a source
-- of truth, dropped and rebuilt at will (the runtime role may DELETE here).
CREATE TABLE snapshots (
    run_id        uuid NOT NULL,
    agent         text NOT NULL,
    -- The agent's state_version (and the encoding's), so a changed fold never
    -- reads an old fold's state.
    fold_version  text NOT NULL,
    -- The state after folding the run's events up to and including this one.
    tx_id         xid8 NOT NULL,
    position      bigint NOT NULL,
    event_id      uuid NOT NULL,
    -- How many of the run's events were folded into it.
    event_count   bigint NOT NULL,
    state         bytea NOT NULL,
    taken_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, agent, fold_version, tx_id, position)
);
