"""Any JSON body, for a source configured without a provider format.

``application/json`` and every structured-syntax ``+json`` media type
(``application/cloudevents+json``, ``application/merge-patch+json``, ...) are
taken; the decoded value, whatever its JSON type, becomes the payload of a
:class:`webhooks.events.WebhookReceived`. The body carries no delivery id and
no ordering key this format could know about: ``delivery_id`` is None and
``partition_key`` is ``""``, and the HTTP layer decides both.
"""

from __future__ import annotations

import msgspec

from webhooks.errors import InvalidPayload, UnsupportedMediaType
from webhooks.events import WebhookReceived
from webhooks.formats import Decoded, media_type

__all__ = ["decode_generic", "is_json_media_type"]

_JSON = msgspec.json.Decoder()


def is_json_media_type(content_type: str) -> bool:
    """``application/json`` or any ``type/subtype+json`` (parameters ignored)."""
    kind = media_type(content_type)
    if kind == "application/json":
        return True
    major, sep, minor = kind.partition("/")
    return bool(major and sep and minor.endswith("+json") and len(minor) > len("+json"))


def decode_generic(body: bytes, content_type: str, source: str) -> Decoded:
    """Any JSON value, kept whole as ``WebhookReceived.payload``."""
    if not is_json_media_type(content_type):
        raise UnsupportedMediaType(
            f"this source takes application/json or a +json media type, got {content_type!r}"
        )
    try:
        payload = _JSON.decode(body)
    except msgspec.DecodeError as exc:
        # msgspec says where: "JSON is malformed: invalid character (byte 12)".
        raise InvalidPayload(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidPayload("the body is not usable JSON: it is nested too deeply") from None
    return Decoded(
        body=WebhookReceived(source=source, payload=payload),
        delivery_id=None,
        partition_key="",
    )
