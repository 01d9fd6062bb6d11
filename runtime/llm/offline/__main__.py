"""``python -m runtime.llm.offline [--host H] [--port N]``: serve the offline model."""

from runtime.llm.offline.server import main

raise SystemExit(main())
