"""Signature schemes: Standard Webhooks (interoperable with the official signer), Mailgun, Basic."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import time
from datetime import UTC, datetime

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from standardwebhooks import Webhook

from webhooks import auth
from webhooks.errors import Unauthorized

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OLD_SECRET = "whsec_" + base64.b64encode(b"an older key, rotated out soon").decode()
KEY = auth.decode_secret(SECRET)
OLD_KEY = auth.decode_secret(OLD_SECRET)
BODY = b'{"type":"invoice.paid","id":42}'


def official(secret: str, msg_id: str, ts: int, body: bytes) -> dict[str, str]:
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(ts, UTC), body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": signature}


def test_official_signer_is_accepted() -> None:
    now = int(time.time())
    assert auth.verify_standard([KEY], official(SECRET, "msg_1", now, BODY), BODY) == "msg_1"


def test_our_signer_is_accepted_by_the_official_verifier() -> None:
    now = int(time.time())
    headers = {
        "webhook-id": "msg_2",
        "webhook-timestamp": str(now),
        "webhook-signature": auth.sign(KEY, "msg_2", now, BODY),
    }
    Webhook(SECRET).verify(BODY, headers)  # raises on mismatch


def test_rotation_any_key_and_any_of_several_signatures() -> None:
    now = int(time.time())
    old_sig = auth.sign(OLD_KEY, "m", now, BODY)
    new_sig = auth.sign(KEY, "m", now, BODY)
    base = {"webhook-id": "m", "webhook-timestamp": str(now)}
    # Sender signs with both keys during rotation; receiver knows only the new one.
    assert auth.verify_standard([KEY], {**base, "webhook-signature": f"{old_sig} {new_sig}"}, BODY)
    # Receiver knows both, sender still on the old one.
    assert auth.verify_standard([KEY, OLD_KEY], {**base, "webhook-signature": old_sig}, BODY)
    # Unknown schemes are skipped, not fatal.
    assert auth.verify_standard([KEY], {**base, "webhook-signature": f"v1a,xyz {new_sig}"}, BODY)


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"webhook-signature": None}, "signature_missing"),
        ({"webhook-id": ""}, "signature_missing"),
        ({"webhook-timestamp": "soon"}, "timestamp_invalid"),
        ({"webhook-timestamp": "-5"}, "timestamp_invalid"),
        ({"webhook-timestamp": "1" * 40}, "timestamp_invalid"),
        ({"webhook-timestamp": "OLD"}, "timestamp_stale"),
        ({"webhook-timestamp": "FUTURE"}, "timestamp_future"),
        ({"webhook-signature": "v1,@@not-base64@@"}, "signature_malformed"),
        ({"webhook-signature": "nocomma"}, "signature_malformed"),
        ({"webhook-signature": "v2,AAAA"}, "signature_malformed"),
        ({"webhook-id": "other-id"}, "signature_mismatch"),
    ],
)
def test_bad_headers_are_401_with_a_reason(change: dict[str, str | None], code: str) -> None:
    now = int(time.time())
    headers: dict[str, str | None] = dict(official(SECRET, "msg_3", now, BODY))
    for key, value in change.items():
        if value == "OLD":
            value = str(now - auth.TOLERANCE_SECONDS - 5)
        elif value == "FUTURE":
            value = str(now + auth.TOLERANCE_SECONDS + 5)
        headers[key] = value
    present = {k: v for k, v in headers.items() if v is not None}
    with pytest.raises(Unauthorized) as info:
        auth.verify_standard([KEY], present, BODY)
    assert info.value.code == code
    assert info.value.status == 401


def test_tampered_body_and_wrong_secret_are_refused() -> None:
    now = int(time.time())
    headers = official(SECRET, "msg_4", now, BODY)
    with pytest.raises(Unauthorized, match="no signature matches"):
        auth.verify_standard([KEY], headers, BODY + b" ")
    with pytest.raises(Unauthorized, match="no signature matches"):
        auth.verify_standard([OLD_KEY], headers, BODY)


def test_timestamps_within_tolerance_both_ways_pass() -> None:
    now = int(time.time())
    for ts in (now - auth.TOLERANCE_SECONDS + 5, now + auth.TOLERANCE_SECONDS - 5):
        assert auth.verify_standard([KEY], official(SECRET, "m", ts, BODY), BODY) == "m"


@given(
    st.dictionaries(
        st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature"]),
        st.text(max_size=60),
    ),
    st.binary(max_size=64),
)
# Found by this test on CI: "²".isdigit() is True, int("²") raises ValueError (a 500).
@example({"webhook-id": "0", "webhook-timestamp": "²", "webhook-signature": "0"}, b"")
@example({"webhook-id": "0", "webhook-timestamp": "١٢٣", "webhook-signature": "v1,x"}, b"")
def test_no_header_garbage_raises_anything_but_401(headers: dict[str, str], body: bytes) -> None:
    # Anything but a 401 (an exception of another kind) fails the test.
    with contextlib.suppress(Unauthorized):
        auth.verify_standard([KEY], headers, body)


def test_mailgun_signature_and_tolerance() -> None:
    key = b"key-mailgun-signing"
    now = str(int(time.time()))
    token = "a" * 50
    sig = hmac.new(key, (now + token).encode(), hashlib.sha256).hexdigest()
    auth.verify_mailgun(key, now, token, sig)
    with pytest.raises(Unauthorized, match="does not match"):
        auth.verify_mailgun(key, now, token + "x", sig)
    with pytest.raises(Unauthorized) as info:
        auth.verify_mailgun(key, str(int(now) - 3600), token, sig)
    assert info.value.code == "timestamp_stale"
    with pytest.raises(Unauthorized) as info:
        auth.verify_mailgun(key, "", token, sig)
    assert info.value.code == "signature_missing"
    for stamp in ("²", "١٢٣", "12a"):  # digits int() refuses are not a timestamp either
        with pytest.raises(Unauthorized) as info:
            auth.verify_mailgun(key, stamp, token, sig)
        assert info.value.code == "timestamp_invalid"


def test_basic_auth() -> None:
    good = "Basic " + base64.b64encode(b"postmark:s3cret").decode()
    auth.verify_basic(good, "postmark", "s3cret")
    for header, code in [
        (None, "auth_missing"),
        ("Bearer abc", "auth_malformed"),
        ("Basic !!!", "auth_malformed"),
        ("Basic " + base64.b64encode(b"postmark:wrong").decode(), "auth_mismatch"),
        ("Basic " + base64.b64encode(b"nocolon").decode(), "auth_mismatch"),
    ]:
        with pytest.raises(Unauthorized) as info:
            auth.verify_basic(header, "postmark", "s3cret")
        assert info.value.code == code


def test_secret_decoding() -> None:
    assert auth.decode_secret(SECRET) == base64.b64decode(SECRET[6:])
    with pytest.raises(ValueError, match="base64"):
        auth.decode_secret("whsec_***")
