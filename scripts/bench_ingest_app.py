"""The real ingress app plus a bare ceiling endpoint, served for ``scripts/bench_ingest.py``.

:func:`create_bench_app` builds the app exactly as ``agentrt serve`` does
(``webhooks.app.app_from_env``: settings from the environment, the sources
file from ``AGENTRT_WEBHOOKS_CONFIG``, ``webhooks.app.create_app``) and adds
one route, ``POST /bench/xadd``: it reads the body and appends it, unchanged,
with one ``XADD agentrt:bench:{p0} * body <bytes>`` through the app's own
Redis client, then answers 202 with a small JSON body. Same FastAPI app, same
uvicorn/uvloop/httptools server, same Redis and client: what is left between
the two routes is the ingress handler's own work (signature, decode,
partition key, dedupe script, event encoding, metrics).

Run as a script, it starts uvicorn with the options ``agentrt serve`` uses::

    python scripts/bench_ingest_app.py --port 8123 [--workers 1]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

#: The ceiling's stream; the braces keep it in one Redis Cluster slot like the ingress's.
CEILING_STREAM = "agentrt:bench:{p0}"
CEILING_PATH = "/bench/xadd"


def create_bench_app() -> FastAPI:
    """``webhooks.app.app_from_env`` plus the bare ``POST /bench/xadd`` route."""
    from webhooks.app import app_from_env

    app = app_from_env()

    @app.post(CEILING_PATH, status_code=202, include_in_schema=False)
    async def bench_xadd(request: Request) -> JSONResponse:
        body = await request.body()
        entry = await request.app.state.redis.xadd(CEILING_STREAM, {"body": body})
        entry_id = entry.decode() if isinstance(entry, bytes) else str(entry)
        return JSONResponse({"entry_id": entry_id, "duplicate": False}, status_code=202)

    return app


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description="Serve the ingress plus the bench ceiling.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    # The same options as `agentrt serve` (webhooks/cli.py).
    uvicorn.run(
        "bench_ingest_app:create_bench_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
