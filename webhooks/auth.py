"""Who may post: Standard Webhooks signatures, Mailgun's scheme, HTTP Basic, or (said) anyone."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence

from webhooks.errors import Unauthorized

#: Standard Webhooks: reject timestamps further than this from now, both ways.
TOLERANCE_SECONDS = 5 * 60
_PREFIX = "whsec_"


def decode_secret(secret: str) -> bytes:
    """A ``whsec_``-prefixed base64 secret as its key bytes (the prefix is optional)."""
    raw = secret[len(_PREFIX) :] if secret.startswith(_PREFIX) else secret
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not a base64 webhook secret: {exc}") from None


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,<base64>`` signature of one delivery (what a sender puts in the header)."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify_standard(
    keys: Sequence[bytes],
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
) -> str:
    """Check a Standard Webhooks delivery; return its ``webhook-id``.

    Any of the space-separated ``v1`` signatures may match any of ``keys``
    (several of each, for rotation). Every malformed part is a 401 with the
    reason, never an exception of another kind.
    """
    msg_id = headers.get("webhook-id")
    stamp = headers.get("webhook-timestamp")
    header = headers.get("webhook-signature")
    missing = [
        name
        for name, value in (
            ("webhook-id", msg_id),
            ("webhook-timestamp", stamp),
            ("webhook-signature", header),
        )
        if not value
    ]
    if missing:
        raise Unauthorized(f"missing header(s): {', '.join(missing)}", code="signature_missing")
    assert msg_id is not None and stamp is not None and header is not None
    if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:
        raise Unauthorized(
            "webhook-timestamp must be whole seconds since the epoch", code="timestamp_invalid"
        )
    timestamp = int(stamp)
    current = time.time() if now is None else now
    if timestamp < current - TOLERANCE_SECONDS:
        raise Unauthorized("webhook-timestamp is too old", code="timestamp_stale")
    if timestamp > current + TOLERANCE_SECONDS:
        raise Unauthorized("webhook-timestamp is in the future", code="timestamp_future")
    candidates: list[bytes] = []
    for part in header.split():
        version, sep, encoded = part.partition(",")
        if not sep or version != "v1":
            continue  # other schemes (v1a, ...) are not ours to judge
        try:
            candidates.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
    if not candidates:
        raise Unauthorized(
            "webhook-signature has no well-formed v1 signature", code="signature_malformed"
        )
    signed = f"{msg_id}.{timestamp}.".encode() + body
    for key in keys:
        expected = hmac.new(key, signed, hashlib.sha256).digest()
        # Compare against every candidate, so timing says nothing about which.
        matched = False
        for candidate in candidates:
            matched |= hmac.compare_digest(expected, candidate)
        if matched:
            return msg_id
    raise Unauthorized("no signature matches", code="signature_mismatch")


def verify_mailgun(
    signing_key: bytes, timestamp: str, token: str, signature: str, *, now: float | None = None
) -> None:
    """Mailgun: hex HMAC-SHA256 of timestamp + token with the webhook signing key."""
    if not timestamp or not token or not signature:
        raise Unauthorized("missing timestamp, token or signature field", code="signature_missing")
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 12:
        raise Unauthorized("timestamp must be whole seconds", code="timestamp_invalid")
    current = time.time() if now is None else now
    if abs(int(timestamp) - current) > TOLERANCE_SECONDS:
        raise Unauthorized("timestamp is outside the 5 minute tolerance", code="timestamp_stale")
    expected = hmac.new(signing_key, (timestamp + token).encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature.lower()):
        raise Unauthorized("signature does not match", code="signature_mismatch")


def verify_basic(header: str | None, username: str, password: str) -> None:
    if not header:
        raise Unauthorized("missing Authorization header (HTTP Basic)", code="auth_missing")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        raise Unauthorized("Authorization must be HTTP Basic", code="auth_malformed")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise Unauthorized("Authorization is not valid base64", code="auth_malformed") from None
    user, sep, secret = decoded.partition(":")
    ok = hmac.compare_digest(user.encode(), username.encode()) & hmac.compare_digest(
        secret.encode(), password.encode()
    )
    if not sep or not ok:
        raise Unauthorized("wrong username or password", code="auth_mismatch")
