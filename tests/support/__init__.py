"""What tests share: servers and schemas, event types, worker helpers, webhook samples,
and the apps and plugins tests load by module path (``tests.support.apps.orders``)."""

from __future__ import annotations

from pathlib import Path

#: The repository's root.
REPO = Path(__file__).resolve().parents[2]
