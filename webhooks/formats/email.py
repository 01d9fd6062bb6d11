"""Inbound email: Postmark, Mailgun, SendGrid and raw MIME, each into one ``EmailReceived``.

Conventions shared by every provider:

* Message ids (``message_id``, ``in_reply_to``, ``references``, ``thread_key``
  and attachment content ids) are kept *without* angle brackets:
  ``<abc@example.com>`` becomes ``abc@example.com``.
* ``thread_key`` is the first id of References, else In-Reply-To, else the
  message's own id; it is the ``partition_key`` of the :class:`Decoded`, and
  the message id is its ``delivery_id``.
* A message without any Message-ID gets a deterministic one derived from its
  content (``<sha256 prefix>@agentrt.invalid``), so a redelivery dedupes.
* ``date`` is the Date header as sent, not reparsed: senders' formats vary.
* Attachments are metadata only; ``size`` is the decoded size in bytes.

Bad input raises :class:`InvalidPayload` (``field`` names the provider's own
field or path, e.g. ``"FromFull.Email"``, ``"message-headers[3][1]"``,
``"from"``, ``"From"``) or :class:`UnsupportedMediaType`, never anything else.
"""

from __future__ import annotations

import binascii
import contextlib
import dataclasses
import email.errors
import email.message
import email.parser
import email.policy
import email.utils
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Annotated, TypeVar, cast
from urllib.parse import parse_qsl

import msgspec
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from webhooks.errors import InvalidPayload, UnsupportedMediaType
from webhooks.events import Address, Attachment, EmailReceived
from webhooks.formats import Decoded, Format, media_type

__all__ = [
    "EMAIL_FORMATS",
    "FormData",
    "FormFile",
    "decode_mailgun",
    "decode_mailgun_form",
    "decode_mime",
    "decode_postmark",
    "decode_sendgrid",
    "decode_sendgrid_form",
    "mailgun_auth_fields",
    "mailgun_auth_fields_from_form",
    "parse_form",
]

T = TypeVar("T")

JSON = "application/json"
URLENCODED = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
RFC822 = "message/rfc822"

#: Where an id-less message's synthetic id lives: a reserved TLD (RFC 2606).
SYNTHETIC_ID_DOMAIN = "agentrt.invalid"

#: More is abuse, not mail: such a message is refused rather than turned into
#: an event with a list of thousands of entries.
MAX_ATTACHMENTS = 1000


# --------------------------------------------------------------------------
# Shared helpers: content types, ids, addresses, header text, the event.


def _accept(content_type: str, accepted: tuple[str, ...], provider: str) -> str:
    mt = media_type(content_type)
    if mt not in accepted:
        raise UnsupportedMediaType(
            f"{provider} takes {' or '.join(accepted)}, not {mt or 'no content type'}"
        )
    return mt


_BRACKETED = re.compile(r"<([^<>]*)>")


def _ids(value: str | None) -> list[str]:
    """Message ids in a Message-ID, In-Reply-To or References value, brackets stripped."""
    if not value:
        return []
    found = _BRACKETED.findall(value)
    if not found:
        # Not RFC 5322, but seen in the wild: bare ids separated by spaces or commas.
        found = value.replace(",", " ").split()
    ids = []
    for raw in found:
        msg_id = "".join(raw.split())
        if msg_id:
            ids.append(msg_id)
    return ids


def _first_id(value: str | None) -> str | None:
    ids = _ids(value)
    return ids[0] if ids else None


def _content_id(value: str | None) -> str | None:
    """``"<img1@x>"``, ``"cid:img1@x"`` and ``"img1@x"`` all become ``"img1@x"``."""
    if not value:
        return None
    value = value.strip()
    if value[:4].lower() == "cid:":
        value = value[4:]
    value = "".join(value.strip("<> \t").split())
    return value or None


def _synthetic_id(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return f"{digest.hexdigest()[:32]}@{SYNTHETIC_ID_DOMAIN}"


def _scrub(text: str) -> str:
    """Make ``text`` encodable as UTF-8.

    The email parser carries undecodable header bytes as lone surrogates
    (``surrogateescape``): turn them back into the UTF-8 they usually are
    (RFC 6532), or into U+FFFD when they are not.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return text.encode("utf-8", "replace").decode("utf-8")
        return raw.decode("utf-8", "replace")
    return text


_FOLD = re.compile(r"\r\n|\r|\n")


def _unfold(value: str) -> str:
    return _scrub(_FOLD.sub("", value))


_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([qQbB])\?([^?\s]*)\?=")


def _word_bytes(encoding: str, text: str) -> bytes | None:
    try:
        if encoding in "qQ":
            return binascii.a2b_qp(text.encode("ascii"), header=True)
        return binascii.a2b_base64(text + "=" * (-len(text) % 4), strict_mode=True)
    except ValueError:  # binascii.Error, non-ASCII text
        return None


def _charset_decode(raw: bytes, charset: str) -> str:
    try:
        text = raw.decode(charset, "replace")
    except (LookupError, ValueError):
        text = raw.decode("utf-8", "replace")
    return _scrub(text)


def _decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words (``=?utf-8?q?...?=``), leaving bad ones as they are.

    Linear time (``email.header.decode_header`` is quadratic in the number of
    words). Whitespace between adjacent encoded words is dropped (RFC 2047
    6.2), and adjacent words of one charset are decoded together, since some
    mailers split a multibyte character across two words.
    """
    if "=?" not in value:
        return value
    out: list[str] = []
    run: list[bytes] = []
    run_charset = ""
    pos = 0
    for match in _ENCODED_WORD.finditer(value):
        between = value[pos : match.start()]
        pos = match.end()
        decoded = _word_bytes(match.group(2), match.group(3))
        charset = match.group(1).lower()
        adjacent = bool(run) and not between.strip(" \t")
        if decoded is None or not adjacent or charset != run_charset:
            if run:
                out.append(_charset_decode(b"".join(run), run_charset))
                run = []
            if not adjacent or decoded is None:
                out.append(between)
        if decoded is None:
            out.append(match.group(0))
            continue
        run.append(decoded)
        run_charset = charset
    if run:
        out.append(_charset_decode(b"".join(run), run_charset))
    out.append(value[pos:])
    return "".join(out)


def _addresses(values: Iterable[str], field: str, *, encoded_names: bool = False) -> list[Address]:
    """Every address in header values like ``"Ana <ana@x.org>, bob@y.org"``."""
    try:
        pairs = email.utils.getaddresses([v for v in values if v])
    except RecursionError:
        # Thousands of nested comments: "((((...".
        raise InvalidPayload(f"{field} could not be parsed", field=field) from None
    found = []
    for name, addr in pairs:
        addr = addr.strip()
        if not addr:
            # getaddresses' way of saying "could not parse this one".
            continue
        name = name.strip()
        if encoded_names:
            name = _decode_words(name)
        found.append(Address(email=addr, name=name))
    return found


def _sender(values: Iterable[str], field: str, *, encoded_names: bool = False) -> Address:
    present = [v for v in values if v and v.strip()]
    if not present:
        raise InvalidPayload(f"the message has no {field}", field=field)
    found = _addresses(present, field, encoded_names=encoded_names)
    if not found:
        raise InvalidPayload(f"{field} holds no address: {present[0][:200]!r}", field=field)
    return found[0]


def _header_values(headers: Sequence[tuple[str, str]], name: str) -> list[str]:
    name = name.lower()
    return [value for key, value in headers if key.lower() == name]


def _header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    values = _header_values(headers, name)
    return values[0] if values else None


def _event(
    *,
    source: str,
    provider: str,
    message_id: str,
    sender: Address,
    to: list[Address],
    cc: list[Address],
    subject: str,
    text: str,
    html: str,
    headers: list[tuple[str, str]],
    attachments: list[Attachment],
    in_reply_to: str | None,
    references: list[str],
    date: str | None,
) -> Decoded:
    if len(attachments) > MAX_ATTACHMENTS:
        raise InvalidPayload(
            f"{len(attachments)} attachments; at most {MAX_ATTACHMENTS} are taken",
            field="attachments",
        )
    thread_key = references[0] if references else in_reply_to or message_id
    body = EmailReceived(
        source=source,
        provider=provider,
        message_id=message_id,
        sender=sender,
        to=to,
        cc=cc,
        subject=subject,
        text=text,
        html=html,
        headers=headers,
        attachments=attachments,
        in_reply_to=in_reply_to,
        references=references,
        thread_key=thread_key,
        date=date,
    )
    return Decoded(body=body, delivery_id=message_id, partition_key=thread_key)


# --------------------------------------------------------------------------
# JSON: msgspec decoders built once; errors name the path msgspec reports.

_AT = re.compile(r" - at `\$([^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `([^`]*)`")


def _error_path(exc: msgspec.ValidationError, prefix: str = "") -> str | None:
    """``"... - at `$.FromFull`"`` for a missing ``Email`` -> ``"FromFull.Email"``."""
    message = str(exc)
    at = _AT.search(message)
    path = at.group(1) if at else ""
    missing = _MISSING.match(message)
    if missing:
        path = f"{path}.{missing.group(1)}"
    if path.startswith("."):
        path = path[1:]
    if not prefix:
        return path or None
    if not path:
        return prefix
    return prefix + path if path.startswith("[") else f"{prefix}.{path}"


def _decode_json(decoder: msgspec.json.Decoder[T], data: bytes, what: str, prefix: str = "") -> T:
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise InvalidPayload(f"{what}: {exc}", field=_error_path(exc, prefix)) from None
    except msgspec.DecodeError as exc:
        raise InvalidPayload(f"{what} is not valid JSON: {exc}", field=prefix or None) from None
    except UnicodeDecodeError as exc:
        # msgspec reports invalid UTF-8 inside strings this way.
        raise InvalidPayload(f"{what} is not valid UTF-8: {exc}", field=prefix or None) from None


# --------------------------------------------------------------------------
# Postmark: application/json.


class _PostmarkAddress(msgspec.Struct):
    Email: str
    Name: str | None = None


class _PostmarkHeader(msgspec.Struct):
    Name: str
    Value: str | None = None


class _PostmarkAttachment(msgspec.Struct):
    Name: str | None = None
    Content: str | None = None
    ContentType: str | None = None
    ContentLength: Annotated[int, msgspec.Meta(ge=0)] | None = None
    ContentID: str | None = None


class _PostmarkInbound(msgspec.Struct):
    """The fields of Postmark's inbound webhook this format reads; others are ignored."""

    MessageID: str | None = None
    FromFull: _PostmarkAddress | None = None
    From: str | None = None
    To: str | None = None
    ToFull: list[_PostmarkAddress] | None = None
    Cc: str | None = None
    CcFull: list[_PostmarkAddress] | None = None
    Subject: str | None = None
    Date: str | None = None
    TextBody: str | None = None
    HtmlBody: str | None = None
    Headers: list[_PostmarkHeader] | None = None
    Attachments: list[_PostmarkAttachment] | None = None


_POSTMARK = msgspec.json.Decoder(_PostmarkInbound)


def _postmark_addresses(
    full: list[_PostmarkAddress] | None, plain: str | None, field: str
) -> list[Address]:
    if full:
        return [Address(email=a.Email, name=a.Name or "") for a in full if a.Email]
    return _addresses([plain] if plain else [], field)


def _base64_size(content: str, field: str) -> int:
    try:
        # Postmark sends one unwrapped line; tolerate wrapped lines, nothing else.
        if any(ws in content for ws in "\r\n\t "):
            content = "".join(content.split())
        return len(binascii.a2b_base64(content, strict_mode=True))
    except ValueError as exc:  # binascii.Error, or non-ASCII text
        raise InvalidPayload(f"{field} is not valid base64: {exc}", field=field) from None


def decode_postmark(body: bytes, content_type: str, source: str) -> Decoded:
    """Postmark's inbound webhook JSON."""
    _accept(content_type, (JSON,), "postmark")
    doc = _decode_json(_POSTMARK, body, "postmark payload")

    if doc.FromFull is not None and doc.FromFull.Email:
        sender = Address(email=doc.FromFull.Email, name=doc.FromFull.Name or "")
    elif doc.FromFull is not None:
        raise InvalidPayload("FromFull.Email is empty", field="FromFull.Email")
    else:
        sender = _sender([doc.From or ""], "FromFull")

    headers = [(h.Name, h.Value or "") for h in doc.Headers or ()]
    message_id = _first_id(_header(headers, "Message-ID")) or _first_id(doc.MessageID)
    if message_id is None:
        raise InvalidPayload("no Message-ID header and no MessageID", field="MessageID")

    attachments = []
    for i, att in enumerate(doc.Attachments or ()):
        if att.Content:
            size = _base64_size(att.Content, f"Attachments[{i}].Content")
        else:
            size = att.ContentLength or 0
        attachments.append(
            Attachment(
                filename=att.Name or "",
                content_type=media_type(att.ContentType or "") or "application/octet-stream",
                size=size,
                content_id=_content_id(att.ContentID),
            )
        )

    return _event(
        source=source,
        provider="postmark",
        message_id=message_id,
        sender=sender,
        to=_postmark_addresses(doc.ToFull, doc.To, "To"),
        cc=_postmark_addresses(doc.CcFull, doc.Cc, "Cc"),
        subject=doc.Subject or "",
        text=doc.TextBody or "",
        html=doc.HtmlBody or "",
        headers=headers,
        attachments=attachments,
        in_reply_to=_first_id(_header(headers, "In-Reply-To")),
        references=_ids(" ".join(_header_values(headers, "References"))),
        date=doc.Date or _header(headers, "Date"),
    )


# --------------------------------------------------------------------------
# Forms: application/x-www-form-urlencoded and multipart/form-data, parsed once.


@dataclasses.dataclass(frozen=True)
class FormFile:
    """A file part of a multipart form: metadata only, the bytes are not kept."""

    #: The form field name, e.g. ``"attachment-1"``.
    name: str
    filename: str
    content_type: str
    size: int


@dataclasses.dataclass(frozen=True)
class FormData:
    """A parsed form: every non-file field's values as raw bytes, and the files.

    Values stay bytes because providers do not all post UTF-8 (SendGrid posts
    each field in its original charset and says which in ``charsets``), and
    because a raw MIME field (SendGrid's ``email``, Mailgun's ``body-mime``)
    is bytes. :meth:`text` decodes one value.
    """

    fields: dict[str, list[bytes]]
    files: list[FormFile]

    def raw(self, name: str) -> bytes | None:
        values = self.fields.get(name)
        return values[0] if values else None

    def text(self, name: str, charset: str = "utf-8") -> str | None:
        """The first value of ``name`` as text; InvalidPayload naming it if undecodable."""
        raw = self.raw(name)
        return None if raw is None else _decode_field(raw, charset, name)

    def get(self, name: str, default: str = "") -> str:
        value = self.text(name)
        return default if value is None else value


def _decode_field(raw: bytes, charset: str, field: str) -> str:
    try:
        text = raw.decode(charset)
    except UnicodeError as exc:
        raise InvalidPayload(f"{field} is not valid {charset}: {exc}", field=field) from None
    except (LookupError, ValueError):
        # An unknown or unusable charset label: UTF-8 is what providers use today.
        return _decode_field(raw, "utf-8", field)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Some codecs (utf-7, unicode_escape) can yield lone surrogates.
        raise InvalidPayload(f"{field} decodes to invalid text", field=field) from None
    return text


def _field_name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPayload(f"form field name {raw[:100]!r} is not UTF-8") from None


def parse_form(body: bytes, content_type: str) -> FormData:
    """Parse a urlencoded or multipart/form-data body once, for every decoder that needs it."""
    mt = _accept(content_type, (URLENCODED, MULTIPART), "a form")
    if mt == URLENCODED:
        return _parse_urlencoded(body)
    return _parse_multipart(body, content_type)


def _parse_urlencoded(body: bytes) -> FormData:
    # latin-1 maps bytes 1:1 both ways, so percent-decoding yields the exact
    # bytes; whether they are text is decided per field, by its reader.
    fields: dict[str, list[bytes]] = {}
    try:
        pairs = parse_qsl(body.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    except ValueError as exc:
        raise InvalidPayload(f"malformed urlencoded form: {exc}") from None
    for name, value in pairs:
        fields.setdefault(_field_name(name.encode("latin-1")), []).append(value.encode("latin-1"))
    return FormData(fields=fields, files=[])


class _MultipartCollector:
    """Callbacks for python-multipart's streaming parser, collecting fields and files."""

    def __init__(self) -> None:
        self.fields: dict[str, list[bytes]] = {}
        self.files: list[FormFile] = []
        self._header_name: list[bytes] = []
        self._header_value: list[bytes] = []
        self._headers: dict[bytes, bytes] = {}
        self._chunks: list[bytes] = []
        self._size = 0
        self._name = ""
        self._filename: str | None = None
        self._content_type = ""

    def part_begin(self) -> None:
        self._headers = {}
        self._chunks = []
        self._size = 0

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name.append(data[start:end])

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value.append(data[start:end])

    def header_end(self) -> None:
        name = b"".join(self._header_name).strip().lower()
        self._headers.setdefault(name, b"".join(self._header_value).strip())
        self._header_name = []
        self._header_value = []

    def headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get(b"content-disposition"))
        name = params.get(b"name")
        if disposition != b"form-data" or name is None:
            raise InvalidPayload("a multipart part has no Content-Disposition: form-data name")
        self._name = _field_name(name)
        filename = params.get(b"filename")
        self._filename = None if filename is None else filename.decode("utf-8", "replace")
        ctype, _ = parse_options_header(self._headers.get(b"content-type"))
        self._content_type = ctype.decode("latin-1") or "application/octet-stream"

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self._filename is None:
            self._chunks.append(data[start:end])
        else:
            self._size += end - start

    def part_end(self) -> None:
        if self._filename is None:
            self.fields.setdefault(self._name, []).append(b"".join(self._chunks))
        else:
            self.files.append(FormFile(self._name, self._filename, self._content_type, self._size))
        self._chunks = []
        self._filename = None


def _parse_multipart(body: bytes, content_type: str) -> FormData:
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidPayload("multipart/form-data without a boundary parameter")
    collector = _MultipartCollector()
    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": collector.part_begin,
                "on_header_field": collector.header_field,
                "on_header_value": collector.header_value,
                "on_header_end": collector.header_end,
                "on_headers_finished": collector.headers_finished,
                "on_part_data": collector.part_data,
                "on_part_end": collector.part_end,
            },
        )
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise InvalidPayload(f"malformed multipart body: {exc}") from None
    if parser.state != MultipartState.END:
        raise InvalidPayload("malformed multipart body: it ends before its closing boundary")
    return FormData(fields=collector.fields, files=collector.files)


def _count(form: FormData, field: str) -> int | None:
    value = form.text(field)
    if value is None or not value.strip():
        return None
    try:
        count = int(value.strip())
    except ValueError:
        count = -1
    if count < 0:
        raise InvalidPayload(f"{field} is not a count: {value[:50]!r}", field=field)
    return count


def _numbered_files(form: FormData, pattern: re.Pattern[str]) -> list[tuple[int, FormFile]]:
    numbered = []
    for file in form.files:
        match = pattern.fullmatch(file.name)
        if match:
            numbered.append((int(match.group(1)), file))
    numbered.sort(key=lambda pair: pair[0])
    return numbered


def _check_count(count: int | None, files: list[tuple[int, FormFile]], field: str) -> None:
    if count is not None and count > len(files):
        raise InvalidPayload(
            f"{field} is {count} but {len(files)} attachment file(s) were posted", field=field
        )


_STR_MAP = msgspec.json.Decoder(dict[str, str])


# --------------------------------------------------------------------------
# Mailgun: a route's forward() POST, urlencoded or (with attachments) multipart.

_MAILGUN_HEADERS = msgspec.json.Decoder(list[tuple[str, str]])
_MAILGUN_ATTACHMENT = re.compile(r"attachment-(\d{1,9})")


def mailgun_auth_fields(body: bytes, content_type: str) -> tuple[str, str, str]:
    """``(timestamp, token, signature)`` of a Mailgun POST, for the HMAC check.

    Parses the whole form: a caller that also decodes should call
    :func:`parse_form` once, then :func:`mailgun_auth_fields_from_form` and
    :func:`decode_mailgun_form`.
    """
    _accept(content_type, (URLENCODED, MULTIPART), "mailgun")
    return mailgun_auth_fields_from_form(parse_form(body, content_type))


def mailgun_auth_fields_from_form(form: FormData) -> tuple[str, str, str]:
    """``(timestamp, token, signature)``; InvalidPayload naming the first one missing."""
    values = []
    for name in ("timestamp", "token", "signature"):
        value = form.text(name)
        if not value:
            raise InvalidPayload(f"the Mailgun POST has no {name}", field=name)
        values.append(value)
    return values[0], values[1], values[2]


def decode_mailgun(body: bytes, content_type: str, source: str) -> Decoded:
    """Mailgun's parsed-message forward() POST (or its raw ``body-mime`` variant)."""
    _accept(content_type, (URLENCODED, MULTIPART), "mailgun")
    return decode_mailgun_form(parse_form(body, content_type), source)


def decode_mailgun_form(form: FormData, source: str) -> Decoded:
    mime = form.raw("body-mime")
    if mime is not None:
        return _decode_message(mime, source, "mailgun")

    raw_headers = form.raw("message-headers")
    headers: list[tuple[str, str]] = []
    if raw_headers is not None:
        headers = _decode_json(
            _MAILGUN_HEADERS, raw_headers, "message-headers", prefix="message-headers"
        )

    def field(name: str, header: str | None = None) -> str | None:
        value = form.text(name)
        if value is None and header is not None:
            value = _header(headers, header)
        return value

    sender = _sender([field("from", "From") or form.get("sender")], "from", encoded_names=True)
    to = field("To", "To") or form.get("recipient")
    cc = field("Cc", "Cc") or ""
    subject = field("subject", "Subject") or ""
    text = form.get("body-plain")
    html = form.get("body-html")
    date = field("Date", "Date")
    references = _ids(field("References", "References"))
    in_reply_to = _first_id(field("In-Reply-To", "In-Reply-To"))
    message_id = _first_id(field("Message-Id", "Message-Id")) or _synthetic_id(
        *(v.encode() for v in (sender.email, to, subject, date or "", text, html))
    )

    content_ids: dict[str, str] = {}
    raw_map = form.raw("content-id-map")
    if raw_map is not None:
        cid_map = _decode_json(_STR_MAP, raw_map, "content-id-map", prefix="content-id-map")
        content_ids = {part: cid for cid, part in cid_map.items()}
    files = _numbered_files(form, _MAILGUN_ATTACHMENT)
    _check_count(_count(form, "attachment-count"), files, "attachment-count")
    attachments = [
        Attachment(
            filename=file.filename,
            content_type=file.content_type,
            size=file.size,
            content_id=_content_id(content_ids.get(file.name)),
        )
        for _, file in files
    ]

    return _event(
        source=source,
        provider="mailgun",
        message_id=message_id,
        sender=sender,
        to=_addresses([to], "To", encoded_names=True),
        cc=_addresses([cc], "Cc", encoded_names=True),
        subject=subject,
        text=text,
        html=html,
        headers=headers,
        attachments=attachments,
        in_reply_to=in_reply_to,
        references=references,
        date=date,
    )


# --------------------------------------------------------------------------
# SendGrid: Inbound Parse, multipart/form-data, default or "send raw" mode.


class _SendGridAttachmentInfo(msgspec.Struct, rename={"content_id": "content-id"}):
    filename: str | None = None
    name: str | None = None
    type: str | None = None
    content_id: str | None = None


class _SendGridEnvelope(msgspec.Struct):
    to: list[str] = []
    # "from" is a keyword: this Struct only validates the envelope's shape.


_SENDGRID_INFO = msgspec.json.Decoder(dict[str, _SendGridAttachmentInfo])
_SENDGRID_ENVELOPE = msgspec.json.Decoder(_SendGridEnvelope)
_SENDGRID_ATTACHMENT = re.compile(r"attachment(\d{1,9})")


def decode_sendgrid(body: bytes, content_type: str, source: str) -> Decoded:
    """SendGrid Inbound Parse (multipart/form-data), default or raw (``email``) mode."""
    _accept(content_type, (MULTIPART,), "sendgrid")
    return decode_sendgrid_form(parse_form(body, content_type), source)


def decode_sendgrid_form(form: FormData, source: str) -> Decoded:
    mime = form.raw("email")
    if mime is not None:
        return _decode_message(mime, source, "sendgrid")

    charsets: dict[str, str] = {}
    raw_charsets = form.raw("charsets")
    if raw_charsets is not None:
        charsets = _decode_json(_STR_MAP, raw_charsets, "charsets", prefix="charsets")

    def text(name: str) -> str | None:
        return form.text(name, charsets.get(name, "utf-8"))

    raw: list[tuple[str, str]] = []
    headers: list[tuple[str, str]] = []
    header_block = form.raw("headers")
    if header_block is not None:
        raw, headers = _guarded(lambda: _message_headers(_HEADER_PARSER.parsebytes(header_block)))

    envelope_to: list[str] = []
    raw_envelope = form.raw("envelope")
    if raw_envelope is not None:
        envelope_to = _decode_json(
            _SENDGRID_ENVELOPE, raw_envelope, "envelope", prefix="envelope"
        ).to

    sender = _sender([text("from") or _header(raw, "From") or ""], "from", encoded_names=True)
    to = text("to") or _header(raw, "To") or ", ".join(envelope_to)
    cc = text("cc") or _header(raw, "Cc") or ""
    subject = text("subject")
    if subject is None:
        subject = _header(headers, "Subject") or ""
    body_text = text("text") or ""
    html = text("html") or ""
    date = _header(headers, "Date")
    message_id = _first_id(_header(raw, "Message-ID")) or _synthetic_id(
        header_block or b"", *(v.encode() for v in (sender.email, to, subject, body_text, html))
    )

    info: dict[str, _SendGridAttachmentInfo] = {}
    raw_info = form.raw("attachment-info")
    if raw_info is not None:
        info = _decode_json(_SENDGRID_INFO, raw_info, "attachment-info", prefix="attachment-info")
    content_ids: dict[str, str] = {}
    raw_cids = form.raw("content-ids")
    if raw_cids is not None:
        cid_map = _decode_json(_STR_MAP, raw_cids, "content-ids", prefix="content-ids")
        content_ids = {part: cid for cid, part in cid_map.items()}
    files = _numbered_files(form, _SENDGRID_ATTACHMENT)
    _check_count(_count(form, "attachments"), files, "attachments")
    attachments = []
    for _, file in files:
        meta = info.get(file.name) or _SendGridAttachmentInfo()
        attachments.append(
            Attachment(
                filename=meta.filename or file.filename or meta.name or "",
                content_type=media_type(meta.type or "") or file.content_type,
                size=file.size,
                content_id=_content_id(meta.content_id or content_ids.get(file.name)),
            )
        )

    return _event(
        source=source,
        provider="sendgrid",
        message_id=message_id,
        sender=sender,
        to=_addresses([to], "to", encoded_names=True),
        cc=_addresses([cc], "cc", encoded_names=True),
        subject=subject,
        text=body_text,
        html=html,
        headers=headers,
        attachments=attachments,
        in_reply_to=_first_id(_header(raw, "In-Reply-To")),
        references=_ids(" ".join(_header_values(raw, "References"))),
        date=date,
    )


# --------------------------------------------------------------------------
# Raw MIME: message/rfc822, parsed with the standard library.


class _Message(email.message.EmailMessage):
    """EmailMessage (for get_body) on the compat32 policy's plain string headers.

    policy.default parses every header into an object on each access, which
    makes a 1 MiB message of 30,000 tiny parts take 10 s instead of 0.6 s;
    this module decodes the header values it needs itself, in linear time.
    ``is_attachment`` is the one EmailMessage method that wants a header
    object; this one reads the string.
    """

    def is_attachment(self) -> bool:
        return self.get_content_disposition() == "attachment"


_MIME_PARSER = email.parser.BytesParser(_Message, policy=email.policy.compat32)
_HEADER_PARSER = email.parser.BytesHeaderParser(_Message, policy=email.policy.compat32)

#: What the standard library's email package can raise from deep inside on
#: hostile bytes (it was written for mail): errors.MessageError, ValueError
#: (UnicodeError among them), LookupError (IndexError, KeyError), TypeError,
#: AttributeError; and RecursionError, for nested multiparts and comments.
_EMAIL_ERRORS: tuple[type[Exception], ...] = (
    email.errors.MessageError,
    ValueError,
    LookupError,
    TypeError,
    AttributeError,
    RecursionError,
)

#: Deeper than any real message; deeper parts are not looked at for attachments.
_MAX_DEPTH = 32


def _guarded(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except _EMAIL_ERRORS as exc:
        raise InvalidPayload(f"the MIME message could not be parsed: {exc!r}"[:500]) from None


def decode_mime(body: bytes, content_type: str, source: str) -> Decoded:
    """A raw RFC 5322 message (``message/rfc822``)."""
    _accept(content_type, (RFC822,), "mime")
    return _decode_message(body, source, "mime")


def _decode_message(raw: bytes, source: str, provider: str) -> Decoded:
    def decode() -> Decoded:
        # The parser's class is _Message; typeshed ties compat32 to Message.
        msg = cast(_Message, _MIME_PARSER.parsebytes(raw))
        return _from_message(msg, raw, source, provider)

    return _guarded(decode)


def _message_headers(
    msg: email.message.Message,
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(raw, decoded) header pairs in order: raw unfolded, decoded with encoded words."""
    raw = [(_scrub(name), _unfold(value)) for name, value in msg.raw_items()]
    return raw, [(name, _decode_words(value)) for name, value in raw]


def _from_message(msg: _Message, raw_bytes: bytes, source: str, provider: str) -> Decoded:
    raw, headers = _message_headers(msg)
    if not raw:
        raise InvalidPayload("the message has no headers", field="headers")
    sender = _sender(_header_values(raw, "From"), "From", encoded_names=True)

    plain_part = msg.get_body(preferencelist=("plain",))
    html_part = msg.get_body(preferencelist=("html",))
    bodies = [p for p in (plain_part, html_part) if p is not None]

    return _event(
        source=source,
        provider=provider,
        message_id=_first_id(_header(raw, "Message-ID")) or _synthetic_id(raw_bytes),
        sender=sender,
        to=_addresses(_header_values(raw, "To"), "To", encoded_names=True),
        cc=_addresses(_header_values(raw, "Cc"), "Cc", encoded_names=True),
        subject=_header(headers, "Subject") or "",
        text=_part_text(plain_part),
        html=_part_text(html_part),
        headers=headers,
        attachments=[_attachment(p) for p in _leaves(msg, 0) if _is_attachment(p, bodies)],
        in_reply_to=_first_id(_header(raw, "In-Reply-To")),
        references=_ids(" ".join(_header_values(raw, "References"))),
        date=_header(headers, "Date"),
    )


def _part_text(part: email.message.Message | None) -> str:
    if part is None:
        return ""
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    if charset in ("us-ascii", "ascii"):
        # A common mislabel of UTF-8; UTF-8 is a superset anyway.
        charset = "utf-8"
    try:
        text = payload.decode(charset, "replace")
    except (LookupError, ValueError):
        text = payload.decode("utf-8", "replace")
    # Line ends as the other providers post them.
    return _scrub(text).replace("\r\n", "\n")


def _leaves(part: email.message.Message, depth: int) -> Iterator[email.message.Message]:
    """Every non-multipart part; an attached message (message/rfc822) is one leaf."""
    if part.get_content_maintype() != "multipart":
        yield part
    elif depth < _MAX_DEPTH:
        payload = part.get_payload()
        if isinstance(payload, list):
            for sub in payload:
                if isinstance(sub, email.message.Message):
                    yield from _leaves(sub, depth + 1)


def _is_attachment(part: email.message.Message, bodies: Sequence[email.message.Message]) -> bool:
    if any(part is body for body in bodies):
        return False
    if part.get_content_maintype() != "text":
        return True
    # A text part that is neither chosen body: an attachment only if it says so.
    return part.get_content_disposition() == "attachment" or part.get_filename() is not None


def _raw_header(part: email.message.Message, name: str) -> str | None:
    name = name.lower()
    for key, value in part.raw_items():
        if key.lower() == name:
            return _unfold(value)
    return None


def _attachment(part: email.message.Message) -> Attachment:
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        size = len(payload)
    else:
        # An attached message: its size as it would be written out again.
        size = 0
        inner = part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], email.message.Message):
            with contextlib.suppress(*_EMAIL_ERRORS):
                size = len(inner[0].as_bytes(policy=email.policy.compat32))
    filename = part.get_filename()
    return Attachment(
        filename=_decode_words(_scrub(filename)) if filename else "",
        content_type=_scrub(part.get_content_type()),
        size=size,
        content_id=_content_id(_raw_header(part, "Content-ID")),
    )


#: Every format of this module by name, for a source's ``format`` setting.
EMAIL_FORMATS: dict[str, Format] = {
    "postmark": decode_postmark,
    "mailgun": decode_mailgun,
    "sendgrid": decode_sendgrid,
    "mime": decode_mime,
}
