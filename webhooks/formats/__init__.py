"""Provider wire formats, each decoded into one typed event.

A format is a function ``decode(body, content_type, source) -> Decoded``. It
raises :class:`webhooks.errors.UnsupportedMediaType` for a content type it
does not take and :class:`webhooks.errors.InvalidPayload` (with ``field`` set
to the offending path, e.g. ``"FromFull.Email"`` or ``"payload.op"``) for a
body it cannot decode. It never raises anything else for bad input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from runtime.events.model import Event


@dataclasses.dataclass(frozen=True)
class Decoded:
    body: Event
    #: The provider's own id for this delivery (an email's Message-ID, a
    #: change's source position), used for dedupe when there is no webhook-id.
    delivery_id: str | None
    #: What keeps related events in order: an email thread, a table row.
    partition_key: str


Format = Callable[[bytes, str, str], Decoded]


def media_type(content_type: str) -> str:
    """``"application/json; charset=utf-8"`` -> ``"application/json"``."""
    return content_type.split(";", 1)[0].strip().lower()
