"""How a worker reads, retries and gives up."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerOptions:
    """How a worker reads, retries and gives up."""

    #: Activations in flight at once in this process (all agents together).
    concurrency: int = 16
    #: Entries asked for per XREADGROUP.
    batch: int = 32
    #: How long an XREADGROUP blocks; also how soon a stop request is noticed.
    block_ms: int = 1000
    #: An entry pending this long on a consumer that stopped renewing it is reclaimed.
    claim_idle: float = 60.0
    #: Deliveries of one entry (first read and reclaims) before it is dead-lettered.
    max_deliveries: int = 5
    #: On stop, how long in-flight activations may take to finish.
    drain_timeout: float = 30.0
    #: Seconds between trims of the streams below what every group acknowledged.
    trim_interval: float = 30.0
    #: Ingress partitions (``agentrt:in:{p0}`` ..), as the webhooks config sets them.
    partitions: int = 8
    #: This process's consumer name (default: host-pid-random).
    consumer: str | None = None
    #: Seconds a handler may run unless its agent sets ``timeout``.
    handler_timeout: float = 300.0

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.batch < 1 or self.max_deliveries < 1:
            raise ValueError("concurrency, batch and max_deliveries must be at least 1")
        if self.claim_idle <= 0 or self.block_ms < 1 or self.handler_timeout <= 0:
            raise ValueError("claim_idle, block_ms and handler_timeout must be positive")
