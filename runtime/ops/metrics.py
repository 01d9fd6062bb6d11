"""Prometheus metrics of workers, the relay and the LLM layer (one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

ACTIVATIONS = Counter(
    "agentrt_activations_total",
    "Activations by agent and outcome "
    "(completed, budget_exceeded, duplicate, skipped, failed, dead_lettered).",
    ["agent", "outcome"],
)
ACTIVATION_SECONDS = Histogram(
    "agentrt_activation_seconds",
    "From an entry's arrival at the worker to its XACK, for committed activations.",
    ["agent"],
    buckets=_LATENCY,
)
LLM_SECONDS = Histogram(
    "agentrt_llm_seconds",
    "Model call latency, retries included.",
    ["model"],
    buckets=_LATENCY,
)
LLM_TOKENS = Counter(
    "agentrt_llm_tokens_total", "Tokens used, by model and kind (input, output).", ["model", "kind"]
)
LLM_COST = Counter("agentrt_llm_cost_usd_total", "Cost in USD by model.", ["model"])
RETRIES = Counter("agentrt_retries_total", "Retried attempts by step kind and reason.",
                  ["kind", "reason"])  # fmt: skip
DEAD_LETTERS = Counter("agentrt_dead_letters_total", "Entries sent to the dead-letter stream.",
                       ["agent"])  # fmt: skip
CIRCUIT_STATE = Gauge(
    "agentrt_circuit_state", "Circuit breaker state (0 closed, 1 half-open, 2 open).", ["name"]
)
CONSUMER_LAG = Gauge(
    "agentrt_consumer_lag",
    "Entries of a stream not yet acknowledged by an agent's group (pending + never delivered).",
    ["agent", "stream"],
)
GROUP_FLUSH_SIZE = Histogram(
    "agentrt_group_flush_size",
    "Items per shared statement of a worker's group writers (step records, first-step "
    "reads, activation commits).",
    ["writer"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
RELAYED = Counter("agentrt_relayed_total", "Log events the relay published, by type.", ["type"])

STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}
