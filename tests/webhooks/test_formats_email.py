"""The inbound email formats: Postmark, Mailgun, SendGrid and raw MIME.

Pure unit tests: each format is decoded from its sample under
scripts/samples/email/ (the same files ``agentrt webhooks send`` posts), then
bent into every kind of bad input the HTTP layer must answer with 415 or 422.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.events.model import encode_body, registry
from tests.support import REPO
from webhooks.errors import InvalidPayload, UnsupportedMediaType
from webhooks.events import Address, Attachment, EmailReceived
from webhooks.formats import Decoded
from webhooks.formats.email import (
    EMAIL_FORMATS,
    MAX_ATTACHMENTS,
    FormData,
    decode_mailgun,
    decode_mailgun_form,
    decode_mime,
    decode_postmark,
    decode_sendgrid,
    decode_sendgrid_form,
    mailgun_auth_fields,
    mailgun_auth_fields_from_form,
    parse_form,
)

SAMPLES = REPO / "scripts" / "samples" / "email"
JSON = "application/json"
URLENCODED = "application/x-www-form-urlencoded"
RFC822 = "message/rfc822"
#: The key the Mailgun samples are signed with (HMAC-SHA256 of timestamp + token).
MAILGUN_SAMPLE_KEY = b"sample-mailgun-signing-key"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def sample_type(name: str) -> str:
    return (SAMPLES / f"{name}.content-type").read_text().strip()


def postmark_doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(sample("postmark.json"))
    return doc


def postmark(doc: dict[str, Any]) -> EmailReceived:
    return email_of(decode_postmark(json.dumps(doc).encode(), JSON, "inbox"))


def email_of(decoded: Decoded) -> EmailReceived:
    assert isinstance(decoded.body, EmailReceived)
    return decoded.body


Part = tuple[str, bytes | str] | tuple[str, bytes | str, str, str]


def multipart(parts: list[Part], boundary: str = "TeStBoUnDaRy") -> tuple[bytes, str]:
    """A multipart/form-data body: (name, value) fields and (name, data, filename, type) files."""
    out = []
    for part in parts:
        out.append(f"--{boundary}\r\n".encode())
        if len(part) == 4:
            out.append(
                f'Content-Disposition: form-data; name="{part[0]}"; filename="{part[2]}"\r\n'
                f"Content-Type: {part[3]}\r\n".encode()
            )
        else:
            out.append(f'Content-Disposition: form-data; name="{part[0]}"\r\n'.encode())
        value = part[1]
        out.append(b"\r\n" + (value if isinstance(value, bytes) else value.encode()) + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def sendgrid_parts(**replace: bytes | str | None) -> list[Part]:
    """The SendGrid sample's fields, some replaced (None drops one)."""
    replace = dict(replace)
    form = parse_form(sample("sendgrid.multipart"), sample_type("sendgrid.multipart"))
    parts: list[Part] = []
    for name, values in form.fields.items():
        if name in replace:
            value = replace.pop(name)
            if value is not None:
                parts.append((name, value))
        else:
            parts.extend((name, v) for v in values)
    parts.extend((name, value) for name, value in replace.items() if value is not None)
    for file in form.files:
        parts.append((file.name, b"x" * file.size, file.filename, file.content_type))
    return parts


def mailgun_form(**replace: str | None) -> bytes:
    """The urlencoded Mailgun sample, some fields replaced (None drops one)."""
    replace = dict(replace)
    fields = [
        (name, values[0].decode())
        for name, values in parse_form(sample("mailgun.form"), URLENCODED).fields.items()
    ]
    out = [(n, replace.pop(n) if n in replace else v) for n, v in fields]
    out.extend(replace.items())
    return urlencode([(n, v) for n, v in out if v is not None]).encode()


def assert_invalid(fn: Callable[[], object], field: str | None) -> InvalidPayload:
    with pytest.raises(InvalidPayload) as info:
        fn()
    assert info.value.status == 422
    assert info.value.field == field, info.value.message
    assert info.value.to_json()["code"] == "invalid_payload"
    return info.value


# ---------------------------------------------------------------------------
# Every sample


ALL_SAMPLES = [
    ("postmark.json", JSON, decode_postmark, "postmark"),
    ("mailgun.multipart", None, decode_mailgun, "mailgun"),
    ("mailgun.form", None, decode_mailgun, "mailgun"),
    ("sendgrid.multipart", None, decode_sendgrid, "sendgrid"),
    ("message.eml", RFC822, decode_mime, "mime"),
]


@pytest.mark.parametrize(("name", "ctype", "decode", "provider"), ALL_SAMPLES)
def test_every_sample_decodes_into_an_event_the_log_reads_back(
    name: str, ctype: str | None, decode: Callable[[bytes, str, str], Decoded], provider: str
) -> None:
    assert len(sample(name)) < 20_000
    decoded = decode(sample(name), ctype or sample_type(name), "inbox")
    event = email_of(decoded)
    assert event.provider == provider
    assert event.source == "inbox"
    assert decoded.delivery_id == event.message_id
    assert decoded.partition_key == event.thread_key != ""
    assert "<" not in event.message_id and ">" not in event.message_id
    stored = encode_body(event)
    assert registry.decode("email.received", 1, stored) == event


def test_the_sample_content_types_name_their_boundaries() -> None:
    assert sample_type("postmark.json") == JSON
    assert sample_type("mailgun.form") == URLENCODED
    assert sample_type("message.eml") == RFC822
    for name in ("mailgun.multipart", "sendgrid.multipart"):
        ctype = sample_type(name)
        assert ctype.startswith("multipart/form-data; boundary=")
        boundary = ctype.split("boundary=", 1)[1]
        assert sample(name).startswith(f"--{boundary}\r\n".encode())
        assert sample(name).endswith(f"--{boundary}--\r\n".encode())


def test_the_formats_are_registered_by_name() -> None:
    assert EMAIL_FORMATS["postmark"] is decode_postmark
    assert EMAIL_FORMATS["mailgun"] is decode_mailgun
    assert EMAIL_FORMATS["sendgrid"] is decode_sendgrid
    assert EMAIL_FORMATS["mime"] is decode_mime
    assert len(EMAIL_FORMATS) == 4


# ---------------------------------------------------------------------------
# Postmark


def test_postmark_sample() -> None:
    decoded = decode_postmark(sample("postmark.json"), JSON, "inbox")
    event = email_of(decoded)
    assert event.sender == Address("support@postmarkapp.com", "Postmarkapp Support")
    assert event.to == [
        Address("yourhash+SampleHash@inbound.postmarkapp.com", "Firstname Lastname")
    ]
    assert event.cc == [
        Address("firstcc@postmarkapp.com", "First Cc"),
        Address("secondCc@postmarkapp.com", ""),
    ]
    assert event.subject == "Test subject"
    assert event.text == "This is a test text body."
    assert event.html == "<html><body><p>This is a test html body.</p></body></html>"
    assert event.date == "Fri, 1 Aug 2014 16:45:32 -04:00"
    # Headers in order, duplicates kept.
    names = [name for name, _ in event.headers]
    assert names[:4] == ["X-Header-Test", "Received", "Received", "X-Spam-Status"]
    assert ("X-Spam-Score", "-0.1") in event.headers
    assert event.attachments == [
        Attachment("test.txt", "text/plain", 45, None),
        Attachment("logo.png", "image/png", 69, "logo.png@01D0A1B2.C3D4E5F0"),
    ]
    # The RFC Message-ID wins over Postmark's own MessageID, brackets stripped.
    assert event.message_id == "CAL5Lp9Xyo0mEQ6-c1yAQ+SuKXrT4Xu5y-7BnvnGS4RMjZOBJ=g@mail.gmail.com"
    assert event.in_reply_to == "CAL5Lp9Wq1vU3k2mYxQ6t0aP-dq+P7K0cR8s@mail.gmail.com"
    assert event.references == [
        "CAL5Lp9U2bB3nCkF7dP9-xTz0aQ@mail.gmail.com",
        "CAL5Lp9Wq1vU3k2mYxQ6t0aP-dq+P7K0cR8s@mail.gmail.com",
    ]
    assert event.thread_key == "CAL5Lp9U2bB3nCkF7dP9-xTz0aQ@mail.gmail.com"
    assert decoded.partition_key == event.thread_key
    assert decoded.delivery_id == event.message_id


def test_postmark_without_message_id_header_uses_postmarks_id() -> None:
    doc = postmark_doc()
    doc["Headers"] = [
        h for h in doc["Headers"] if h["Name"] not in ("Message-ID", "In-Reply-To", "References")
    ]
    event = postmark(doc)
    assert event.message_id == "73e6d360-66eb-11e1-8e72-a8904824019b"
    assert event.in_reply_to is None
    assert event.references == []
    assert event.thread_key == event.message_id


def test_postmark_threads_on_in_reply_to_without_references() -> None:
    doc = postmark_doc()
    doc["Headers"] = [h for h in doc["Headers"] if h["Name"] != "References"]
    event = postmark(doc)
    assert event.thread_key == "CAL5Lp9Wq1vU3k2mYxQ6t0aP-dq+P7K0cR8s@mail.gmail.com"


def test_postmark_takes_a_charset_parameter_and_plain_address_strings() -> None:
    doc = postmark_doc()
    del doc["FromFull"], doc["ToFull"], doc["CcFull"]
    doc["From"] = '"Ana Pérez" <ana@example.org>'
    body = json.dumps(doc).encode()
    event = email_of(decode_postmark(body, "Application/JSON; charset=utf-8", "inbox"))
    assert event.sender == Address("ana@example.org", "Ana Pérez")
    assert event.to == [
        Address("yourhash+SampleHash@inbound.postmarkapp.com", "Firstname Lastname")
    ]
    assert event.cc == [
        Address("firstcc@postmarkapp.com", "First Cc"),
        Address("secondCc@postmarkapp.com", ""),
    ]


@pytest.mark.parametrize("ctype", ["text/plain", URLENCODED, RFC822, ""])
def test_postmark_refuses_other_content_types(ctype: str) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        decode_postmark(sample("postmark.json"), ctype, "inbox")
    assert info.value.status == 415
    assert "application/json" in info.value.message


def _set(path: list[str | int], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(path: list[str | int]) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_delete(["FromFull", "Email"]), "FromFull.Email"),
        (_set(["FromFull", "Email"], 5), "FromFull.Email"),
        (_set(["FromFull", "Email"], ""), "FromFull.Email"),
        (_set(["FromFull"], "support@postmarkapp.com"), "FromFull"),
        (_set(["ToFull", 0, "Email"], None), "ToFull[0].Email"),
        (_set(["Attachments", 0, "ContentLength"], "45"), "Attachments[0].ContentLength"),
        (_delete(["Headers", 1, "Name"]), "Headers[1].Name"),
        (_set(["Headers"], {"Message-ID": "<a@b>"}), "Headers"),
        (_set(["Subject"], ["Test subject"]), "Subject"),
        (_set(["Attachments", 0, "Content"], "not base64!"), "Attachments[0].Content"),
        (_set(["Attachments", 1, "Content"], "QUJDRA="), "Attachments[1].Content"),
        (_set(["Attachments", 0, "Content"], "QUJD=RA=="), "Attachments[0].Content"),
        (_set(["Attachments", 0, "Content"], "QUJDéRA=="), "Attachments[0].Content"),
    ],
)
def test_postmark_bad_fields_are_named(
    mutate: Callable[[dict[str, Any]], None], field: str
) -> None:
    doc = postmark_doc()
    mutate(doc)
    assert_invalid(lambda: postmark(doc), field)


def test_postmark_without_any_sender_names_fromfull() -> None:
    doc = postmark_doc()
    del doc["FromFull"], doc["From"]
    assert_invalid(lambda: postmark(doc), "FromFull")


def test_postmark_without_any_message_id_names_messageid() -> None:
    doc = postmark_doc()
    del doc["MessageID"]
    doc["Headers"] = []
    assert_invalid(lambda: postmark(doc), "MessageID")


@pytest.mark.parametrize(
    "body",
    [b'{"From": ', b"", b"null", b"[]", b'"text"', b'{"Subject": "caf\xe9"}', b"\xff\xfe{}"],
)
def test_postmark_malformed_json_is_invalid(body: bytes) -> None:
    err = assert_invalid(lambda: decode_postmark(body, JSON, "inbox"), None)
    assert err.message.startswith("postmark payload")


def test_postmark_attachment_size_is_the_decoded_size() -> None:
    doc = postmark_doc()
    content = bytes(range(256)) * 2800  # ~700 KiB: the body stays under 1 MiB
    doc["Attachments"] = [
        {"Name": "blob.bin", "Content": base64.b64encode(content).decode(), "ContentLength": 1},
        # Wrapped at 76 columns, as MIME does: still valid.
        {"Name": "wrapped.txt", "Content": base64.encodebytes(b"y" * 1000).decode()},
        # No content (Postmark does send the length): the length is taken.
        {"Name": "empty.txt", "ContentType": "text/plain; charset=utf-8", "ContentLength": 12},
    ]
    body = json.dumps(doc).encode()
    assert len(body) < 1 << 20
    event = email_of(decode_postmark(body, JSON, "inbox"))
    assert [(a.filename, a.size, a.content_type) for a in event.attachments] == [
        ("blob.bin", len(content), "application/octet-stream"),
        ("wrapped.txt", 1000, "application/octet-stream"),
        ("empty.txt", 12, "text/plain"),
    ]


# ---------------------------------------------------------------------------
# Mailgun


def test_mailgun_multipart_sample() -> None:
    decoded = decode_mailgun(
        sample("mailgun.multipart"), sample_type("mailgun.multipart"), "support"
    )
    event = email_of(decoded)
    assert event.provider == "mailgun"
    assert event.sender == Address("ana.perez@example.org", "Ana María Pérez")
    assert event.to == [Address("support@support.example.com", "Example Support")]
    assert event.cc == [Address("billing@example.org", "Billing"), Address("bob@example.org", "")]
    assert event.subject == "Re: [#4821] Invoice for October"
    assert event.text.startswith("Hi,\n\nthe invoice total looks wrong")
    assert event.html.startswith('<div dir="ltr"><p>Hi,</p>')
    assert event.date == "Mon, 25 Nov 2024 11:21:01 +0100"
    # message-headers, in order, duplicates kept.
    assert event.headers[:3] == [
        ("X-Mailgun-Incoming", "Yes"),
        ("Received", event.headers[1][1]),
        ("Received", event.headers[2][1]),
    ]
    assert event.headers[1][1].startswith("from mail-wr1-f41.google.com")
    assert event.headers[2][1].startswith("by mail-wr1-f41.google.com")
    assert ("Content-Type", 'multipart/mixed; boundary="000000000000a1b2c3d4e5f60718"') in (
        event.headers
    )
    assert event.attachments == [
        Attachment("invoice-october.pdf", "application/pdf", 218, None),
        Attachment("highlight.png", "image/png", 69, "ii_m3w9x2k10"),
    ]
    assert event.message_id == "CAHx3Ld9f2QmV7pK4s@mail.example.org"
    assert event.in_reply_to == "ticket-4821.2@support.example.com"
    assert event.references == [
        "ticket-4821.1@support.example.com",
        "ticket-4821.2@support.example.com",
    ]
    assert decoded.partition_key == event.thread_key == "ticket-4821.1@support.example.com"


def test_mailgun_urlencoded_sample_threads_on_in_reply_to() -> None:
    decoded = decode_mailgun(sample("mailgun.form"), URLENCODED, "support")
    event = email_of(decoded)
    assert event.sender == Address("bob@example.net", "Bob Stone")
    assert event.to == [Address("support@support.example.com", "")]
    assert event.cc == []
    assert event.subject == "Re: Password reset"
    assert event.text == "Thanks, the reset link worked.\n\nBob\n"
    assert event.html == ""
    assert event.attachments == []
    assert event.message_id == "20241125104958.4f1c2a@example.net"
    assert event.references == []
    assert event.in_reply_to == "reset-99017@support.example.com"
    assert decoded.partition_key == event.thread_key == "reset-99017@support.example.com"
    assert [name for name, _ in event.headers][:3] == ["X-Mailgun-Incoming", "Received", "From"]


@pytest.mark.parametrize("name", ["mailgun.multipart", "mailgun.form"])
def test_mailgun_auth_fields_verify_with_the_sample_key(name: str) -> None:
    ctype = sample_type(name)
    timestamp, token, signature = mailgun_auth_fields(sample(name), ctype)
    assert timestamp.isdigit()
    assert len(token) == 50
    expected = hmac.new(MAILGUN_SAMPLE_KEY, (timestamp + token).encode(), hashlib.sha256)
    assert hmac.compare_digest(signature, expected.hexdigest())


def test_mailgun_form_parsed_once_serves_auth_and_decoding() -> None:
    body, ctype = sample("mailgun.multipart"), sample_type("mailgun.multipart")
    form = parse_form(body, ctype)
    assert isinstance(form, FormData)
    assert [f.name for f in form.files] == ["attachment-1", "attachment-2"]
    assert form.files[0].filename == "invoice-october.pdf"
    assert form.text("recipient") == "support@support.example.com"
    assert form.fields["attachment-count"] == [b"2"]
    assert mailgun_auth_fields_from_form(form) == mailgun_auth_fields(body, ctype)
    assert decode_mailgun_form(form, "support") == decode_mailgun(body, ctype, "support")


@pytest.mark.parametrize("missing", ["timestamp", "token", "signature"])
def test_mailgun_auth_fields_name_the_missing_one(missing: str) -> None:
    body = mailgun_form(**{missing: None})
    assert_invalid(lambda: mailgun_auth_fields(body, URLENCODED), missing)
    body = mailgun_form(**{missing: ""})
    assert_invalid(lambda: mailgun_auth_fields(body, URLENCODED), missing)


@pytest.mark.parametrize("ctype", [JSON, RFC822, "text/plain", ""])
def test_mailgun_refuses_other_content_types(ctype: str) -> None:
    for call in (decode_mailgun, lambda b, c, _s: mailgun_auth_fields(b, c)):
        with pytest.raises(UnsupportedMediaType) as info:
            call(sample("mailgun.form"), ctype, "support")
        assert URLENCODED in info.value.message
        assert "multipart/form-data" in info.value.message


def test_mailgun_without_from_names_from() -> None:
    headers = json.dumps([["To", "support@support.example.com"]])
    body = mailgun_form(**{"from": None, "From": None, "sender": None, "message-headers": headers})
    assert_invalid(lambda: decode_mailgun(body, URLENCODED, "support"), "from")


def test_mailgun_falls_back_to_the_envelope_sender_and_recipient() -> None:
    headers = json.dumps([["Subject", "x"]])
    body = mailgun_form(**{"from": None, "From": None, "To": None, "message-headers": headers})
    event = email_of(decode_mailgun(body, URLENCODED, "support"))
    assert event.sender == Address("bob@example.net", "")
    assert event.to == [Address("support@support.example.com", "")]


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("[[", "message-headers"),
        ('{"From": "a@b"}', "message-headers"),
        ('[["From"]]', "message-headers[0]"),
        ('[["From", "a@b"], ["To", null]]', "message-headers[1][1]"),
    ],
)
def test_mailgun_bad_message_headers_are_named(value: str, field: str) -> None:
    body = mailgun_form(**{"message-headers": value})
    assert_invalid(lambda: decode_mailgun(body, URLENCODED, "support"), field)


def test_mailgun_non_utf8_field_is_named() -> None:
    body = mailgun_form(**{"body-plain": None}) + b"&body-plain=caf%E9"
    assert_invalid(lambda: decode_mailgun(body, URLENCODED, "support"), "body-plain")


def test_mailgun_non_utf8_field_name_is_invalid() -> None:
    body = mailgun_form() + b"&caf%E9=1"
    err = assert_invalid(lambda: decode_mailgun(body, URLENCODED, "support"), None)
    assert "not UTF-8" in err.message


@pytest.mark.parametrize("count", ["3", "two", "-2"])
def test_mailgun_attachment_count_must_match_the_files(count: str) -> None:
    form = parse_form(sample("mailgun.multipart"), sample_type("mailgun.multipart"))
    parts: list[Part] = [(n, v) for n, values in form.fields.items() for v in values]
    parts = [p for p in parts if p[0] != "attachment-count"] + [("attachment-count", count)]
    parts.append(("attachment-1", b"%PDF", "a.pdf", "application/pdf"))
    body, ctype = multipart(parts)
    assert_invalid(lambda: decode_mailgun(body, ctype, "support"), "attachment-count")


def test_mailgun_without_message_id_gets_a_stable_synthetic_one() -> None:
    headers = json.dumps([["From", "bob@example.net"]])
    body = mailgun_form(**{"Message-Id": None, "In-Reply-To": None, "message-headers": headers})
    first = decode_mailgun(body, URLENCODED, "support")
    again = decode_mailgun(body, URLENCODED, "support")
    event = email_of(first)
    assert event.message_id.endswith("@agentrt.invalid")
    assert first.delivery_id == again.delivery_id == event.message_id == event.thread_key
    other = mailgun_form(
        **{"Message-Id": None, "In-Reply-To": None, "message-headers": headers, "subject": "x"}
    )
    assert email_of(decode_mailgun(other, URLENCODED, "support")).message_id != event.message_id


def test_mailgun_raw_mime_mode() -> None:
    body, ctype = multipart(
        [("recipient", "support@support.example.com"), ("body-mime", sample("message.eml"))]
    )
    event = email_of(decode_mailgun(body, ctype, "support"))
    mime = email_of(decode_mime(sample("message.eml"), RFC822, "support"))
    assert event.provider == "mailgun"
    assert event == msgspec.structs.replace(mime, provider="mailgun")


# ---------------------------------------------------------------------------
# Multipart forms, malformed


def _truncated() -> tuple[bytes, str]:
    body = sample("sendgrid.multipart")
    return body[: len(body) // 2], sample_type("sendgrid.multipart")


MALFORMED_MULTIPART = [
    pytest.param(*_truncated(), id="truncated"),
    pytest.param(b"", "multipart/form-data; boundary=xYzZY", id="empty"),
    pytest.param(sample("sendgrid.multipart"), "multipart/form-data", id="no-boundary"),
    pytest.param(sample("sendgrid.multipart"), "multipart/form-data; boundary=", id="empty-b"),
    pytest.param(sample("sendgrid.multipart"), "multipart/form-data; boundary=nope", id="other-b"),
    pytest.param(
        sample("sendgrid.multipart"), "multipart/form-data; boundary=" + "x" * 300, id="long-b"
    ),
    pytest.param(
        b"--B\r\nContent-Type: text/plain\r\n\r\nv\r\n--B--\r\n",
        "multipart/form-data; boundary=B",
        id="no-disposition",
    ),
    pytest.param(
        b'--B\r\nContent-Disposition: attachment; filename="a"\r\n\r\nv\r\n--B--\r\n',
        "multipart/form-data; boundary=B",
        id="not-form-data",
    ),
    pytest.param(
        b'--B\r\nContent-Disposition: form-data; name="caf\xe9"\r\n\r\nv\r\n--B--\r\n',
        "multipart/form-data; boundary=B",
        id="non-utf8-name",
    ),
    pytest.param(
        b"--B\r\n" + b"X-H: v\r\n" * 50 + b'Content-Disposition: form-data; name="a"\r\n\r\n--B--',
        "multipart/form-data; boundary=B",
        id="too-many-part-headers",
    ),
    pytest.param(
        b'preamble\r\n--B\r\nContent-Disposition: form-data; name="a"\r\n\r\nv\r\n--B--\r\n',
        "multipart/form-data; boundary=B",
        id="preamble",
    ),
]


@pytest.mark.parametrize(("body", "ctype"), MALFORMED_MULTIPART)
def test_malformed_multipart_is_invalid(body: bytes, ctype: str) -> None:
    for decode in (decode_mailgun, decode_sendgrid):
        assert_invalid(lambda d=decode: d(body, ctype, "inbox"), None)
    assert_invalid(lambda: parse_form(body, ctype), None)


def test_parse_form_keeps_repeated_fields_and_file_metadata() -> None:
    # Data that almost is a boundary, and bytes that are not text.
    odd = b"\x00\r\n--TeStBoUnDaRx\r\n--TeStBoUnDaRy-" * 100
    body, ctype = multipart(
        [
            ("to", "a@example.org"),
            ("to", "b@example.org"),
            ("empty", ""),
            ("attachment1", odd, "odd.bin", "application/x-odd"),
            ("blob", b"\xff\xfe", "caf\xe9.txt", "text/plain"),
        ]
    )
    form = parse_form(body, ctype)
    assert form.fields == {"to": [b"a@example.org", b"b@example.org"], "empty": [b""]}
    assert form.get("to") == "a@example.org"
    assert form.get("missing", "default") == "default"
    assert [(f.name, f.filename, f.content_type, f.size) for f in form.files] == [
        ("attachment1", "odd.bin", "application/x-odd", len(odd)),
        ("blob", "café.txt", "text/plain", 2),
    ]


# ---------------------------------------------------------------------------
# SendGrid


def test_sendgrid_sample() -> None:
    ctype = sample_type("sendgrid.multipart")
    decoded = decode_sendgrid(sample("sendgrid.multipart"), ctype, "parse")
    event = email_of(decoded)
    assert event.provider == "sendgrid"
    assert event.sender == Address("ana.perez@example.org", "Ana María Pérez")
    assert event.to == [Address("inbound@inbound.example.com", "Inbound")]
    assert event.cc == [Address("warehouse@example.org", "Warehouse")]
    assert event.subject == "Re: Shipping label"
    assert event.text == "Here is the label, and the photo of the damaged box.\n\n-- \nAna\n"
    assert event.html.startswith('<div dir="ltr">Here is the label')
    assert event.date == "Mon, 25 Nov 2024 10:10:11 -0800"
    # The raw header block, parsed: order and duplicates kept, folded lines
    # unfolded, encoded words decoded.
    names = [name for name, _ in event.headers]
    assert names[:3] == ["Received", "Received", "MIME-Version"]
    assert ("From", "Ana María Pérez <ana.perez@example.org>") in event.headers
    assert (
        "References",
        "<ticket-5120.1@inbound.example.com> <ticket-5120.3@inbound.example.com>",
    ) in event.headers
    assert event.attachments == [
        Attachment("damaged-box.png", "image/png", 69, "ii_1562e2169c132d83"),
        Attachment("label.pdf", "application/pdf", 218, None),
    ]
    assert event.message_id == "CAN8a7+Lk3pE2q@mail.example.org"
    assert event.in_reply_to == "ticket-5120.3@inbound.example.com"
    assert event.references == [
        "ticket-5120.1@inbound.example.com",
        "ticket-5120.3@inbound.example.com",
    ]
    assert decoded.partition_key == event.thread_key == "ticket-5120.1@inbound.example.com"


def test_sendgrid_raw_mode_decodes_the_mime_message() -> None:
    body, ctype = multipart(
        [
            ("dkim", "{@example.org : pass}"),
            ("email", sample("message.eml")),
            ("to", "support@support.example.com"),
            ("from", "ana.perez@example.org"),
            ("envelope", '{"to":["support@support.example.com"],"from":"ana.perez@example.org"}'),
        ]
    )
    event = email_of(decode_sendgrid(body, ctype, "parse"))
    mime = email_of(decode_mime(sample("message.eml"), RFC822, "parse"))
    assert event == msgspec.structs.replace(mime, provider="sendgrid")
    assert len(event.attachments) == 2


def test_sendgrid_fields_decode_with_their_declared_charsets() -> None:
    parts = sendgrid_parts(
        subject="Caf\xe9 cr\xe8me".encode("latin-1"),
        text="\u00a1Hola!".encode("utf-16"),
        charsets='{"subject": "iso-8859-1", "text": "UTF-16", "html": "no-such-charset"}',
    )
    body, ctype = multipart(parts)
    event = email_of(decode_sendgrid(body, ctype, "parse"))
    assert event.subject == "Café crème"
    assert event.text == "¡Hola!"
    assert event.html.startswith('<div dir="ltr">')  # unknown label: read as UTF-8


@pytest.mark.parametrize(
    ("replace", "field"),
    [
        ({"text": b"caf\xe9"}, "text"),
        ({"subject": b"\\ud800", "charsets": '{"subject": "unicode_escape"}'}, "subject"),
        ({"from": None, "headers": "Subject: no sender\n"}, "from"),
        ({"from": "undisclosed-recipients:;", "headers": None}, "from"),
        ({"charsets": "{"}, "charsets"),
        ({"charsets": '{"subject": 8}'}, "charsets[...]"),
        ({"envelope": "to: a@b"}, "envelope"),
        ({"envelope": '{"to": "a@b"}'}, "envelope.to"),
        ({"attachment-info": "[]"}, "attachment-info"),
        ({"attachment-info": '{"attachment1": {"type": 1}}'}, "attachment-info[...].type"),
        ({"content-ids": '{"ii_1": ["attachment1"]}'}, "content-ids[...]"),
        ({"attachments": "3"}, "attachments"),
        ({"attachments": "-1"}, "attachments"),
    ],
)
def test_sendgrid_bad_fields_are_named(replace: dict[str, bytes | str | None], field: str) -> None:
    body, ctype = multipart(sendgrid_parts(**replace))
    assert_invalid(lambda: decode_sendgrid(body, ctype, "parse"), field)


def test_sendgrid_falls_back_to_headers_and_envelope() -> None:
    body, ctype = multipart(sendgrid_parts(**{"from": None, "to": None, "cc": None}))
    event = email_of(decode_sendgrid(body, ctype, "parse"))
    # From and Cc from the header block (encoded name decoded), To from it too.
    assert event.sender == Address("ana.perez@example.org", "Ana María Pérez")
    assert event.to == [Address("inbound@inbound.example.com", "Inbound")]
    assert event.cc == [Address("warehouse@example.org", "Warehouse")]
    body, ctype = multipart(sendgrid_parts(to=None, headers="From: a@example.org\n"))
    event = email_of(decode_sendgrid(body, ctype, "parse"))
    assert event.to == [Address("inbound@inbound.example.com", "")]
    assert event.message_id.endswith("@agentrt.invalid")


def test_sendgrid_refuses_urlencoded() -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        decode_sendgrid(b"from=a%40b", URLENCODED, "parse")
    assert "multipart/form-data" in info.value.message


def test_sendgrid_form_parsed_once() -> None:
    body, ctype = sample("sendgrid.multipart"), sample_type("sendgrid.multipart")
    assert decode_sendgrid_form(parse_form(body, ctype), "parse") == decode_sendgrid(
        body, ctype, "parse"
    )


# ---------------------------------------------------------------------------
# Raw MIME


def test_mime_sample() -> None:
    decoded = decode_mime(sample("message.eml"), RFC822, "mx")
    event = email_of(decoded)
    assert event.provider == "mime"
    # RFC 2047 encoded display name and subject decoded.
    assert event.sender == Address("ana.perez@example.org", "Ana María Pérez")
    assert event.to == [
        Address("support@support.example.com", "Example Support"),
        Address("sam.lee@support.example.com", "Lee, Sam"),
    ]
    assert event.cc == [Address("billing@example.org", "")]
    assert event.subject == "Re: [#4821] Invoice for October — corrected"
    # Quoted-printable UTF-8, soft line break inside a character, CRLF -> LF.
    assert event.text == (
        "Hi Sam,\n\nhere is the corrected invoice — the total is now 1\u00a0240,00 €.\n\nAna\n"
    )
    assert event.html.startswith("<html><body><p>Hi Sam,</p>")
    assert '<img src="cid:sig-logo@example.org">' in event.html
    assert event.date == "Tue, 26 Nov 2024 10:14:01 +0100"
    names = [name for name, _ in event.headers]
    assert names[:3] == ["Received", "Received", "MIME-Version"]
    assert names.count("Received") == 2
    assert event.headers[0][1].startswith("from mail.example.org (mail.example.org [198.51.100.7])")
    assert "\n" not in event.headers[0][1]  # unfolded
    # The inline image inside multipart/related and the attached PDF, decoded sizes.
    assert event.attachments == [
        Attachment("logo.png", "image/png", 69, "sig-logo@example.org"),
        Attachment("invoice-october-corrected.pdf", "application/pdf", 218, None),
    ]
    assert event.message_id == "CAHx3Ld9k8RtW2@mail.example.org"
    assert event.in_reply_to == "ticket-4821.3@support.example.com"
    assert event.references == [
        "ticket-4821.1@support.example.com",
        "ticket-4821.2@support.example.com",
        "ticket-4821.3@support.example.com",
    ]
    assert decoded.partition_key == event.thread_key == "ticket-4821.1@support.example.com"
    assert decoded.delivery_id == "CAHx3Ld9k8RtW2@mail.example.org"


@pytest.mark.parametrize(
    "ctype", ["text/plain", "message/rfc822x", JSON, "application/octet-stream"]
)
def test_mime_refuses_other_content_types(ctype: str) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        decode_mime(sample("message.eml"), ctype, "mx")
    assert "message/rfc822" in info.value.message


def test_mime_takes_message_rfc822_with_parameters() -> None:
    event = email_of(decode_mime(sample("message.eml"), "message/RFC822; charset=utf-8", "mx"))
    assert event.message_id == "CAHx3Ld9k8RtW2@mail.example.org"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"", "headers"),
        (b"just a body, no header at all\r\n", "headers"),
        (b"\r\nFrom: a@example.org\r\n\r\nthe header is in the body\r\n", "headers"),
        (b"To: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n", "From"),
        (b"From: \r\nSubject: hi\r\n\r\nbody\r\n", "From"),
        (b"From: undisclosed-recipients:;\r\n\r\nbody\r\n", "From"),
        (b"From: a@example.org\r\nTo: " + b"(" * 5000 + b"\r\n\r\nbody\r\n", "To"),
    ],
)
def test_mime_missing_parts_are_named(body: bytes, field: str) -> None:
    assert_invalid(lambda: decode_mime(body, RFC822, "mx"), field)


def test_mime_without_message_id_gets_a_stable_synthetic_one() -> None:
    body = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
    first = decode_mime(body, RFC822, "mx")
    assert first == decode_mime(body, RFC822, "mx")
    event = email_of(first)
    assert event.message_id.endswith("@agentrt.invalid")
    assert first.delivery_id == first.partition_key == event.message_id
    other = email_of(decode_mime(body + b"more\r\n", RFC822, "mx"))
    assert other.message_id != event.message_id
    assert event.text == "body\n"


def test_mime_header_encodings() -> None:
    body = (
        b"From: =?utf-8?b?QW5h?= =?utf-8?b?IE1hcsOtYQ==?= <ana@example.org>\r\n"
        # Raw UTF-8 (RFC 6532), and one character split across two words.
        b"To: J\xc3\xbcrgen <j@example.org>\r\n"
        b"Subject: =?utf-8?q?caf=C3?=\r\n =?utf-8?q?=A9?= and =?utf-8?b?!!bad?= =?x-nope?q?ok?=\r\n"
        b"X-Latin1: caf\xe9\r\n"
        b"Message-ID: <id@example.org>\r\n\r\nbody\r\n"
    )
    event = email_of(decode_mime(body, RFC822, "mx"))
    assert event.sender == Address("ana@example.org", "Ana María")
    assert event.to == [Address("j@example.org", "Jürgen")]
    assert event.subject == "café and =?utf-8?b?!!bad?= ok"
    # Undecodable 8-bit header bytes become U+FFFD, not an error or a surrogate.
    assert ("X-Latin1", "caf\ufffd") in event.headers
    encode_body(event)


def test_mime_bodies_and_attachments_edge_cases() -> None:
    body = b"""From: a@example.org\r
Content-Type: multipart/mixed; boundary=b\r
\r
--b\r
Content-Type: text/plain; charset=x-unknown\r
\r
caf\xc3\xa9\r
--b\r
Content-Type: text/csv\r
Content-Disposition: attachment; filename="data.csv"\r
\r
a,b\r
--b\r
Content-Type: text/plain\r
\r
a stray footer is neither body nor attachment\r
--b\r
Content-Type: message/rfc822\r
\r
From: inner@example.org\r
Subject: forwarded\r
\r
inner body\r
--b\r
Content-Type: application/octet-stream\r
Content-Transfer-Encoding: base64\r
Content-ID: cid:blob\r
\r
AAECAw==\r
--b--\r
"""
    event = email_of(decode_mime(body, RFC822, "mx"))
    assert event.text == "café"
    assert event.html == ""
    inner = b"From: inner@example.org\r\nSubject: forwarded\r\n\r\ninner body"
    assert [(a.filename, a.content_type, a.content_id) for a in event.attachments] == [
        ("data.csv", "text/csv", None),
        ("", "message/rfc822", None),
        ("", "application/octet-stream", "blob"),
    ]
    assert event.attachments[0].size == 3
    assert abs(event.attachments[1].size - len(inner)) <= 4
    assert event.attachments[2].size == 4


def test_mime_deep_nesting_and_attachment_floods_are_invalid() -> None:
    nested = b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n" + (
        b"".join(
            b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
            for i in range(5000)
        )
    )
    assert_invalid(lambda: decode_mime(nested, RFC822, "mx"), None)
    flood = (
        b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        + b"--b\r\nContent-Type: image/png\r\n\r\nx\r\n" * (MAX_ATTACHMENTS + 1)
        + b"--b--\r\n"
    )
    assert_invalid(lambda: decode_mime(flood, RFC822, "mx"), "attachments")


def test_mime_large_message_decodes() -> None:
    payload = bytes(range(256)) * 3000  # ~750 KiB attachment
    body = (
        b"From: a@example.org\r\nMessage-ID: <big@example.org>\r\n"
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--b\r\nContent-Type: application/zip\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="big.zip"\r\n\r\n'
        + base64.encodebytes(payload)
        + b"--b--\r\n"
    )
    assert len(body) < 1 << 20
    event = email_of(decode_mime(body, RFC822, "mx"))
    assert event.attachments == [Attachment("big.zip", "application/zip", len(payload), None)]
    assert event.text == "see attached"


# ---------------------------------------------------------------------------
# Arbitrary input: only InvalidPayload / UnsupportedMediaType, and anything
# decoded is an event the log can store.

DECODERS: list[tuple[Callable[[bytes, str, str], Decoded], str, str]] = [
    (decode_postmark, JSON, "postmark.json"),
    (decode_mailgun, URLENCODED, "mailgun.form"),
    (decode_mailgun, sample_type("mailgun.multipart"), "mailgun.multipart"),
    (decode_sendgrid, sample_type("sendgrid.multipart"), "sendgrid.multipart"),
    (decode_mime, RFC822, "message.eml"),
]
DECODER_IDS = ["postmark", "mailgun-form", "mailgun-multipart", "sendgrid", "mime"]


def _decode_or_refuse(
    decode: Callable[[bytes, str, str], Decoded], body: bytes, ctype: str
) -> None:
    try:
        decoded = decode(body, ctype, "fuzz")
    except (InvalidPayload, UnsupportedMediaType) as exc:
        assert exc.status in (415, 422)
        return
    event = email_of(decoded)
    assert decoded.delivery_id == event.message_id
    assert decoded.partition_key == event.thread_key
    assert registry.decode("email.received", 1, encode_body(event)) == event


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize(("decode", "ctype", "name"), DECODERS, ids=DECODER_IDS)
@FUZZ
@given(body=st.binary(max_size=4096))
def test_arbitrary_bytes_are_refused_cleanly(
    decode: Callable[[bytes, str, str], Decoded], ctype: str, name: str, body: bytes
) -> None:
    _decode_or_refuse(decode, body, ctype)


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """The sample with a few slices replaced by random bytes or dropped."""
    body = original
    for _ in range(draw(st.integers(1, 4))):
        start = draw(st.integers(0, len(body)))
        end = draw(st.integers(start, min(len(body), start + 64)))
        insert = draw(
            st.one_of(
                st.binary(max_size=16),
                st.sampled_from(
                    [b"", b"\r\n", b"\r\n\r\n", b"\xff", b"=?utf-8?b?", b"<", b'"', b"(", b"\\"]
                ),
            )
        )
        body = body[:start] + insert + body[end:]
    return body


@pytest.mark.parametrize(("decode", "ctype", "name"), DECODERS, ids=DECODER_IDS)
@FUZZ
@given(data=st.data())
def test_mutated_samples_are_decoded_or_refused_cleanly(
    decode: Callable[[bytes, str, str], Decoded], ctype: str, name: str, data: st.DataObject
) -> None:
    _decode_or_refuse(decode, data.draw(mutated(sample(name))), ctype)


@FUZZ
@given(
    header=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=200).map(
        lambda s: s.encode("utf-8", "surrogatepass")
    )
    | st.binary(max_size=200),
    name=st.sampled_from([b"From", b"To", b"Cc", b"Subject", b"Content-Type", b"References"]),
)
def test_arbitrary_header_values_are_decoded_or_refused_cleanly(name: bytes, header: bytes) -> None:
    header = header.replace(b"\r", b" ").replace(b"\n", b" ")
    body = (
        b"From: a@example.org\r\n" + name + b": " + header + b"\r\n"
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\n"
        b"Content-Type: image/png\r\nContent-Disposition: attachment; filename=" + header + b"\r\n"
        b"\r\nx\r\n--b--\r\n"
    )
    _decode_or_refuse(decode_mime, body, RFC822)


@FUZZ
@given(ctype=st.text(max_size=60))
def test_arbitrary_content_types_are_refused_cleanly(ctype: str) -> None:
    for decode, _, name in DECODERS:
        _decode_or_refuse(decode, sample(name), ctype)
