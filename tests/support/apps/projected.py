"""An app with a projection of its own (and no agents): `--app tests.support.apps.projected`."""

from __future__ import annotations

from tests.projections.test_engine import Ticks

projections = [Ticks()]
