"""The query API: JSON routes over the read models, behind a bearer token.

``create_api(settings)`` is the app ``agentrt api`` serves; ``mount(app, settings)`` (the
``agentrt.routes`` entry point) adds the same routes to the ingress app.
"""

from __future__ import annotations

from projections.api.app import create_api, mount
from projections.api.auth import configured_token, ensure_token
from projections.api.backend import Backend

__all__ = ["Backend", "configured_token", "create_api", "ensure_token", "mount"]
