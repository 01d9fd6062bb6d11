"""The offline model: a local, deterministic server speaking the Anthropic Messages API.

With no ``ANTHROPIC_API_KEY`` the runtime points the real ``anthropic`` SDK at this
server (``base_url``), so the production code path runs unchanged in demos and
tests: the SDK builds real HTTP requests, this server answers with real Messages
API bodies, and the SDK parses them, retries them and raises its own exceptions.
It is a small rule-based model, not a mock: nothing is scripted per test, the
same request always gets the byte-identical answer, and every answer is visibly
labelled offline.

Rules (``OfflineModel.respond``), first match wins. "User text" is the text of the
last ``user`` message; a trailing ``assistant`` turn (prefill) is ignored; the
text of ``system``-role messages is appended to the ``system`` prompt.

1. **Tool results.** The last user message holds ``tool_result`` blocks:

   - a result with ``is_error: true`` for a tool still offered (and
     ``tool_choice`` not ``none``) is *reflection*: the model calls that tool
     again with a schema-valid input;
   - ``tool_choice`` ``any`` / ``tool`` forces another tool call (as the API does);
   - otherwise a text answer summarizing the results:
     ``[offline] Based on the <tool> result: <result text, at most 300 chars>.``

2. **Forced tool use.** ``tool_choice`` ``{"type": "tool", "name": N}`` calls N;
   ``{"type": "any"}`` calls the best-matching tool (rule 3's score, ties to the
   first tool).
3. **Chosen tool use.** ``tool_choice`` ``auto`` (or absent) with tools: a tool is
   scored on the user text: +10 when its name appears (``get_weather`` or
   ``get weather``), +1 per keyword of its name and description (words of 3+
   letters, not stop words) found in the user text. The best tool scoring above
   0 is called; ties go to the first tool. ``tool_choice`` ``none`` never calls.
4. **Structured output.** ``output_config.format`` of type ``json_schema``, or a
   system prompt asking for JSON ("respond with JSON", "JSON object", "JSON
   schema", ...): the answer is JSON text. With a schema (from
   ``output_config``, or the first ``{...}`` in the system prompt that parses
   as a JSON object with ``type``, ``properties`` or ``$schema``) it is an
   instance generated as for tool inputs (below); without one it is
   ``{"answer": "<plain answer>", "offline": true}``. JSON text carries no
   ``[offline]`` prefix (it would not parse); the message id and header still
   mark it.
5. **Classification.** The system prompt, else the user text, lists labels after
   ``one of``, ``labels``, ``categories``, ``classes``, ``options``,
   ``choices``, ``choose from``, ``choose between`` or ``among`` -- inline
   (``Reply with one of: billing, support, spam``; separators ``,`` ``|`` ``/``
   ``or``) or as a bullet list on the following lines (``- billing: invoices,
   refunds``; words after the label describe it). The answer is
   ``[offline] <label>``: the label whose words (and description words) overlap
   the user text most; words match when equal or when one is a prefix of the
   other and both have 4+ letters (``bill`` ~ ``billing``). Ties, including no
   overlap at all, go to the first label.
6. **Text.** ``[offline] Re: "<first 160 chars of the user text>". Key terms:
   a, b, c.`` (up to five keywords in order of appearance).

Tool inputs and JSON instances are generated from the JSON schema so that they
validate: ``$ref`` (local), ``allOf`` / ``anyOf`` / ``oneOf`` (first non-null
branch), ``const``, ``enum`` (the value best matching the user text, else the
first), ``default``; only required properties are filled. Strings, in order:
``<property> is/=/: <value>`` in the user text (also with the name's words
apart: ``customer id 42``), a value of the right ``format`` found in the text
(email, uri) or a fixed one (date, date-time, uuid), the next unused quoted
string, the user text itself for free-text names (``query``, ``text``,
``message``, ...), the next unused capitalized word that does not start a
sentence (``Paris``), else the property name; ``minLength`` / ``maxLength`` are
respected by padding / cutting (``pattern`` is not). Integers and numbers: the
value after the property name, else the first number in the text, else 0,
clamped to ``minimum`` / ``maximum`` (and their exclusive forms). Booleans are
``false``; arrays hold ``max(1, minItems)`` items; objects recurse.

Output limits: text longer than ``max_tokens`` (estimated) is cut with
``stop_reason: "max_tokens"``; a ``stop_sequences`` entry found in the text cuts
it before the earliest one with ``stop_reason: "stop_sequence"``. Tool-use
blocks are never cut. Tokens are estimated as one per four characters (at least
one): input over the JSON of system, messages and tools; output over the text
and the JSON of tool inputs.

Offline marks: the message ``id`` is ``msg_offline_<hash of the request>``,
tool-use ids are ``toolu_offline_<hash>``, text answers start with
``[offline] ``, and every HTTP response has the header ``x-agentrt-offline:
true``. ``model`` echoes the requested model id. The body holds no time and no
randomness: the same request (``stream`` aside) gives the same bytes.

The server (``create_app`` / ``OfflineServer`` / ``serve``):

- ``POST /v1/messages``: validates the body like the API (``400
  invalid_request_error`` naming the field, e.g. ``max_tokens: Field
  required``; tool_use / tool_result pairing is checked too), requires an
  ``x-api-key`` (any value) or ``authorization`` header (``401
  authentication_error``). ``stream: true`` is served as server-sent events
  (``message_start``, ``ping``, ``content_block_start`` / ``_delta`` /
  ``_stop``, ``message_delta``, ``message_stop``) that accumulate to the same
  message as the non-streaming answer.
- ``POST /v1/messages/count_tokens``: ``{"input_tokens": n}``.
- ``GET /healthz``.
- Errors use the API's shape ``{"type": "error", "error": {"type", "message"},
  "request_id"}`` with a ``request-id`` header.
- Fault injection, for tests: a queue consumed one fault per ``/v1/messages``
  request (a fault with ``model`` set waits for a request for that model), set
  in-process (``server.faults.push(Fault("rate_limit", retry_after=2))``) or
  over HTTP (``POST /_offline/faults`` with a JSON list or object,
  ``GET`` / ``DELETE /_offline/faults``). Kinds: ``rate_limit`` (429
  ``rate_limit_error`` with ``retry-after``, default 1 s), ``overloaded`` (529
  ``overloaded_error``), ``server_error`` (500 ``api_error``), ``slow`` (sleep
  ``seconds``, default 1, then answer; abandoned if the client disconnects),
  ``malformed_tool_input`` (a tool-use block whose input breaks the tool's
  schema: the first required property is left out, else the first property
  gets the wrong type; needs tools in the request, else the answer is normal).
  The auth check comes before faults; faults come before body validation.
- Every ``/v1/...`` request is recorded (``server.requests``, ``GET`` /
  ``DELETE /_offline/requests``) with its body, status and fault, so tests can
  count model calls.

The installed SDK maps statuses to exceptions as: 400 ``BadRequestError``, 401
``AuthenticationError``, 429 ``RateLimitError``, 500 ``InternalServerError``,
529 ``OverloadedError`` (a subclass of ``InternalServerError``), a read timeout
``APITimeoutError``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeGuard

import httpx
import msgspec
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = [
    "DEFAULT_PORT",
    "OFFLINE_HEADER",
    "OFFLINE_MESSAGE_PREFIX",
    "OFFLINE_TEXT_PREFIX",
    "OFFLINE_TOOL_USE_PREFIX",
    "Fault",
    "FaultKind",
    "FaultQueue",
    "InvalidRequestError",
    "OfflineModel",
    "OfflineServer",
    "RecordedRequest",
    "RequestLog",
    "count_input_tokens",
    "create_app",
    "estimate_tokens",
    "instance_for_schema",
    "is_offline_message",
    "main",
    "serve",
    "strip_offline_marker",
    "validate_request",
]

JSON = dict[str, Any]

DEFAULT_PORT = 8765
OFFLINE_HEADER = "x-agentrt-offline"
OFFLINE_TEXT_PREFIX = "[offline] "
OFFLINE_MESSAGE_PREFIX = "msg_offline_"
OFFLINE_TOOL_USE_PREFIX = "toolu_offline_"
CHARS_PER_TOKEN = 4
RESULT_SUMMARY_CHARS = 300


def _word_set(words: str) -> frozenset[str]:
    return frozenset(words.split())


_STOPWORDS = _word_set(
    """a about above after again against all am an and any are as at be because been
    before being below between both but by can could did do does doing down during each
    few for from further get got had has have having he her here hers him his how i if in
    into is it its itself just me more most my no nor not now of off on once only or other
    our ours out over own please same she should so some such than that the their theirs
    them then there these they this those through to too under until up use used using very
    was we were what when where which while who whom why will with would you your yours
    reply respond answer return one"""
)

_FREE_TEXT_NAMES = _word_set(
    """query q text message content body question prompt input search summary description
    reason note notes comment comments instructions request topic task goal subject"""
)

_FORMAT_DEFAULTS = {
    "date-time": "1970-01-01T00:00:00Z",
    "date": "1970-01-01",
    "time": "00:00:00Z",
    "email": "offline@example.com",
    "uri": "https://example.com/offline",
    "url": "https://example.com/offline",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "ipv4": "127.0.0.1",
    "hostname": "example.com",
}
_FORMAT_PATTERNS = {
    "email": re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),
    "uri": re.compile(r"https?://[^\s\"'<>]+"),
    "url": re.compile(r"https?://[^\s\"'<>]+"),
}

_WORD = re.compile(r"[a-z0-9]+")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w])")
_QUOTED = re.compile(r"\"([^\"\n]{1,200})\"|“([^”\n]{1,200})”|`([^`\n]{1,200})`|'([^'\n]{1,200})'")
_LABEL_TRIGGER = re.compile(
    r"\b(?:one of|labels?|categories|category|classes|options|choices|choose from|"
    r"choose between|among)\b\s*(?:the following)?\s*(?:labels?|categories|options)?\s*[:\-]?",
    re.IGNORECASE,
)
_JSON_REQUEST = re.compile(
    r"\b(?:respond|reply|answer|return|output|format|produce|give|write)\b[^.\n]{0,40}\bjson\b"
    r"|\bjson\s+(?:object|schema|only|format)\b|\bvalid\s+json\b",
    re.IGNORECASE,
)


# --------------------------------------------------------------------------- text helpers


def estimate_tokens(text: str) -> int:
    """One token per four characters, at least one."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\x00")
    return h.hexdigest()[:24]


def _compact(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _keywords(text: str) -> list[str]:
    return [w for w in _words(text) if len(w) >= 3 and w not in _STOPWORDS]


def _word_match(a: str, b: str) -> bool:
    if a == b:
        return True
    return len(a) >= 4 and len(b) >= 4 and (a.startswith(b) or b.startswith(a))


def _overlap(candidate_words: Sequence[str], text_words: Sequence[str]) -> int:
    """How many distinct candidate words occur in the text (see ``_word_match``)."""
    seen: set[str] = set()
    score = 0
    for cw in candidate_words:
        if cw in seen:
            continue
        seen.add(cw)
        if any(_word_match(cw, tw) for tw in text_words):
            score += 1
    return score


def _best(options: Sequence[Sequence[str]], text: str) -> int:
    """Index of the option whose words overlap ``text`` most; ties to the first."""
    text_words = _words(text)
    best, best_score = 0, -1
    for i, words in enumerate(options):
        score = _overlap(words, text_words)
        if score > best_score:
            best, best_score = i, score
    return best


def _name_parts(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [p for p in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if p]


def strip_offline_marker(text: str) -> str:
    """The text without its leading ``[offline] `` label (unchanged if it has none)."""
    return text.removeprefix(OFFLINE_TEXT_PREFIX)


def is_offline_message(message: Any) -> bool:
    """True for a Messages API answer (dict or SDK ``Message``) from the offline model."""
    ident = message.get("id") if isinstance(message, Mapping) else getattr(message, "id", None)
    return isinstance(ident, str) and ident.startswith(OFFLINE_MESSAGE_PREFIX)


# --------------------------------------------------------------------------- validation


class InvalidRequestError(ValueError):
    """A request the Messages API would refuse with 400 ``invalid_request_error``."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidRequestError(message)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate_request(request: Any, *, count_tokens: bool = False) -> None:
    """Raise ``InvalidRequestError`` (message naming the field) if the API would refuse it."""
    _require(isinstance(request, dict), "Request body must be a JSON object")
    fields = ["model", "messages"] if count_tokens else ["model", "max_tokens", "messages"]
    for name in fields:
        _require(name in request, f"{name}: Field required")
    _require(
        isinstance(request["model"], str) and bool(request["model"]),
        "model: Input should be a non-empty string",
    )
    if not count_tokens:
        max_tokens = request["max_tokens"]
        _require(_is_int(max_tokens), "max_tokens: Input should be a valid integer")
        _require(max_tokens >= 1, "max_tokens: Input should be greater than or equal to 1")
    _validate_system(request.get("system"))
    tool_names = _validate_tools(request.get("tools"))
    _validate_tool_choice(request.get("tool_choice"), tool_names)
    _validate_messages(request["messages"])
    if "stop_sequences" in request:
        seqs = request["stop_sequences"]
        _require(
            isinstance(seqs, list) and all(isinstance(s, str) for s in seqs),
            "stop_sequences: Input should be a valid list of strings",
        )
    if "temperature" in request:
        t = request["temperature"]
        _require(_is_number(t), "temperature: Input should be a valid number")
        _require(0 <= t <= 1, "temperature: Input should be between 0 and 1")
    if "stream" in request:
        _require(isinstance(request["stream"], bool), "stream: Input should be a valid boolean")
    if "metadata" in request:
        _require(isinstance(request["metadata"], dict), "metadata: Input should be an object")


def _validate_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    _require(isinstance(system, list), "system: Input should be a valid string or list")
    for i, block in enumerate(system):
        _require(
            isinstance(block, dict) and block.get("type") == "text",
            f"system.{i}.type: Input should be 'text'",
        )
        _require(isinstance(block.get("text"), str), f"system.{i}.text: Field required")


def _validate_tools(tools: Any) -> list[str]:
    if tools is None:
        return []
    _require(isinstance(tools, list), "tools: Input should be a valid list")
    names: list[str] = []
    for i, tool in enumerate(tools):
        _require(isinstance(tool, dict), f"tools.{i}: Input should be an object")
        _require(
            isinstance(tool.get("name"), str) and bool(tool["name"]),
            f"tools.{i}.name: Field required",
        )
        _require(tool["name"] not in names, f"tools: Tool names must be unique ({tool['name']!r})")
        names.append(tool["name"])
        if tool.get("type") in (None, "custom"):
            _require("input_schema" in tool, f"tools.{i}.input_schema: Field required")
            schema = tool["input_schema"]
            _require(
                isinstance(schema, dict) and schema.get("type") == "object",
                f"tools.{i}.input_schema.type: Input should be 'object'",
            )
    return names


def _validate_tool_choice(choice: Any, tool_names: list[str]) -> None:
    if choice is None:
        return
    _require(isinstance(choice, dict), "tool_choice: Input should be an object")
    kind = choice.get("type")
    _require(
        kind in ("auto", "any", "tool", "none"),
        "tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'",
    )
    if kind == "tool":
        _require(isinstance(choice.get("name"), str), "tool_choice.name: Field required")
        _require(
            choice["name"] in tool_names,
            f"tool_choice.name: Tool '{choice['name']}' not found in tools",
        )
    if kind in ("any", "tool"):
        _require(bool(tool_names), f"tool_choice: type '{kind}' requires tools")


def _validate_messages(messages: Any) -> None:
    _require(isinstance(messages, list), "messages: Input should be a valid list")
    _require(bool(messages), "messages: at least one message is required")
    for i, msg in enumerate(messages):
        where = f"messages.{i}"
        _require(isinstance(msg, dict), f"{where}: Input should be an object")
        _require(
            msg.get("role") in ("user", "assistant", "system"),
            f"{where}.role: Input should be 'user', 'assistant' or 'system'",
        )
        _require("content" in msg, f"{where}.content: Field required")
        content = msg["content"]
        if isinstance(content, str):
            continue
        _require(
            isinstance(content, list), f"{where}.content: Input should be a valid string or list"
        )
        for j, block in enumerate(content):
            bwhere = f"{where}.content.{j}"
            _require(isinstance(block, dict), f"{bwhere}: Input should be an object")
            _require(isinstance(block.get("type"), str), f"{bwhere}.type: Field required")
            kind = block["type"]
            if kind == "text":
                _require(isinstance(block.get("text"), str), f"{bwhere}.text: Field required")
            elif msg["role"] == "system":
                _require(False, f"{bwhere}.type: system messages hold only text blocks")
            elif kind == "tool_use":
                _require(
                    msg["role"] == "assistant",
                    f"{bwhere}: tool_use blocks belong to assistant messages",
                )
                for key in ("id", "name"):
                    _require(isinstance(block.get(key), str), f"{bwhere}.{key}: Field required")
                _require(
                    isinstance(block.get("input"), dict),
                    f"{bwhere}.input: Input should be an object",
                )
            elif kind == "tool_result":
                _require(
                    msg["role"] == "user", f"{bwhere}: tool_result blocks belong to user messages"
                )
                _require(
                    isinstance(block.get("tool_use_id"), str),
                    f"{bwhere}.tool_use_id: Field required",
                )
    # tool_use and tool_result pair up across neighbouring turns, as the API demands.
    for i, msg in enumerate(messages):
        uses = [b["id"] for b in _blocks(msg) if b.get("type") == "tool_use"]
        results = [b["tool_use_id"] for b in _blocks(msg) if b.get("type") == "tool_result"]
        if results:
            previous = messages[i - 1] if i > 0 else None
            offered = {b["id"] for b in _blocks(previous) if b.get("type") == "tool_use"}
            stray = [r for r in results if r not in offered]
            _require(
                not stray,
                f"messages.{i}.content: unexpected `tool_use_id` found in `tool_result` blocks: "
                f"{', '.join(stray)}. Each `tool_result` block must have a corresponding "
                "`tool_use` block in the previous message.",
            )
        if uses and i + 1 < len(messages):
            answered = {
                b["tool_use_id"] for b in _blocks(messages[i + 1]) if b.get("type") == "tool_result"
            }
            missing = [u for u in uses if u not in answered]
            _require(
                not missing,
                f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately "
                f"after: {', '.join(missing)}. Each `tool_use` block must have a corresponding "
                "`tool_result` block in the next message.",
            )


def _blocks(msg: Any) -> list[JSON]:
    if not isinstance(msg, dict):
        return []
    content = msg.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [b for b in content if isinstance(b, dict)]
    return []


# --------------------------------------------------------------------------- schema instances


class _Hints:
    """What the prompt offers for filling a schema: its text, quoted strings, numbers, names."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.quoted = [next(g for g in m.groups() if g is not None) for m in _QUOTED.finditer(text)]
        self.numbers = _NUMBER.findall(text)
        self.capitalized = self._capitalized(text)

    @staticmethod
    def _capitalized(text: str) -> list[str]:
        found: list[str] = []
        for sentence in re.split(r"(?<=[.!?])\s+|\n+", text):
            tokens = re.findall(r"[A-Za-z][\w-]*", sentence)
            for token in tokens[1:]:
                if token[0].isupper() and token.lower() not in _STOPWORDS and token not in found:
                    found.append(token)
        return found

    def take_quoted(self) -> str | None:
        return self.quoted.pop(0) if self.quoted else None

    def take_capitalized(self) -> str | None:
        return self.capitalized.pop(0) if self.capitalized else None

    def value_after(self, name: str, numeric: bool) -> str | None:
        """``<name> is/=/: <value>`` in the text, trying the whole name, then its words."""
        parts = _name_parts(name)
        if not parts:
            return None
        candidates = ["[\\s_-]?".join(map(re.escape, parts))]
        candidates += [re.escape(p) for p in sorted(parts, key=len, reverse=True) if len(p) >= 3]
        for pattern in candidates:
            rx = re.compile(
                rf"(?<![A-Za-z0-9]){pattern}(?![A-Za-z0-9])\s*(?:is|was|=|:|of|to|as|equals|#)?\s*"
                r"(?:\"([^\"]*)\"|'([^']*)'|“([^”]*)”|([^\s,;]+))",
                re.IGNORECASE,
            )
            for m in rx.finditer(self.text):
                value = next(g for g in m.groups() if g is not None)
                value = value.rstrip(".!?)") if m.group(4) is not None else value
                if not value or value.lower() in _STOPWORDS:
                    continue
                if numeric and not _NUMBER.fullmatch(value):
                    continue
                return value
        return None


def _resolve(schema: Any, root: JSON, depth: int) -> JSON:
    """Follow local ``$ref``s and pick one branch of ``allOf`` / ``anyOf`` / ``oneOf``."""
    for _ in range(depth, 32):
        if not isinstance(schema, dict):
            return {}
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target: Any = root
            for key in ref[2:].split("/"):
                target = (
                    target.get(key.replace("~1", "/").replace("~0", "~"), {})
                    if isinstance(target, dict)
                    else {}
                )
            schema = target
            continue
        for key in ("allOf", "anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                usable = [
                    b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")
                ]
                chosen = (usable or branches)[0]
                rest = {k: v for k, v in schema.items() if k != key}
                merged = dict(_resolve(chosen, root, depth + 1))
                merged.update({k: v for k, v in rest.items() if k not in merged})
                schema = merged
                break
        else:
            return schema
    return {}


def _schema_type(schema: JSON) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        return str(kinds[0]) if kinds else "null"
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return None


def _clamp_number(value: float, schema: JSON, integer: bool) -> float:
    step = 1 if integer else 0.5
    lo, hi = schema.get("minimum"), schema.get("maximum")
    xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if _is_number(lo) and value < lo:
        value = math.ceil(lo) if integer else lo
    if _is_number(xlo) and value <= xlo:
        value = math.floor(xlo) + 1 if integer else xlo + step
    if _is_number(hi) and value > hi:
        value = math.floor(hi) if integer else hi
    if _is_number(xhi) and value >= xhi:
        value = math.ceil(xhi) - 1 if integer else xhi - step
    return value


def _string_for(name: str, schema: JSON, hints: _Hints) -> str:
    value: str | None = hints.value_after(name, numeric=False) if name else None
    fmt = schema.get("format")
    if value is None and isinstance(fmt, str):
        pattern = _FORMAT_PATTERNS.get(fmt)
        found = pattern.search(hints.text) if pattern else None
        value = found.group(0) if found else _FORMAT_DEFAULTS.get(fmt)
    if value is None:
        value = hints.take_quoted()
    if value is None and any(p in _FREE_TEXT_NAMES for p in _name_parts(name)):
        value = _compact(hints.text, 200) or None
    if value is None:
        value = hints.take_capitalized()
    if value is None:
        value = name or "offline"
    min_len, max_len = schema.get("minLength"), schema.get("maxLength")
    if _is_int(max_len) and len(value) > max_len:
        value = value[:max_len]
    if _is_int(min_len) and len(value) < min_len:
        value = value + "x" * (min_len - len(value))
    return value


def _number_for(name: str, schema: JSON, hints: _Hints, integer: bool) -> int | float:
    raw = hints.value_after(name, numeric=True) if name else None
    candidates = [raw] if raw is not None else []
    candidates += hints.numbers
    number: float = 0
    for c in candidates:
        if c is None:
            continue
        if integer and "." in c:
            continue
        number = float(c)
        break
    number = _clamp_number(number, schema, integer)
    if integer:
        return int(number)
    return int(number) if float(number).is_integer() else number


def _instance(schema: Any, root: JSON, hints: _Hints, name: str, depth: int) -> Any:
    if depth > 16:
        return None
    s = _resolve(schema, root, depth)
    if "const" in s:
        return s["const"]
    enum = s.get("enum")
    if isinstance(enum, list) and enum:
        return enum[_best([_words(str(v)) for v in enum], hints.text)]
    if "default" in s:
        return s["default"]
    kind = _schema_type(s)
    if kind == "object":
        props = s.get("properties") if isinstance(s.get("properties"), dict) else {}
        assert isinstance(props, dict)
        required = [r for r in s.get("required", []) if isinstance(r, str)]
        result: JSON = {}
        for key in required:
            result[key] = _instance(props.get(key, {}), root, hints, key, depth + 1)
        return result
    if kind == "array":
        min_items, max_items = s.get("minItems"), s.get("maxItems")
        count = max(1, min_items) if _is_int(min_items) else 1
        if _is_int(max_items):
            count = min(count, max_items)
        items = s.get("items", {"type": "string"})
        return [_instance(items, root, hints, name, depth + 1) for _ in range(max(0, count))]
    if kind == "integer":
        return _number_for(name, s, hints, integer=True)
    if kind == "number":
        return _number_for(name, s, hints, integer=False)
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return _string_for(name, s, hints)


def instance_for_schema(schema: Mapping[str, Any], text: str = "") -> Any:
    """A value valid against the JSON ``schema``, filled from ``text`` (see the module rules)."""
    root = dict(schema)
    return _instance(root, root, _Hints(text), "", 0)


def _wrong_value(schema: JSON) -> Any:
    if "enum" in schema or "const" in schema:
        return "__offline_not_allowed__"
    kind = _schema_type(schema)
    if kind == "string":
        return 12345
    if kind in ("integer", "number"):
        return "not a number"
    if kind == "boolean":
        return "not a boolean"
    if kind == "array":
        return "not an array"
    if kind == "object":
        return "not an object"
    return None


def _malformed_instance(schema: JSON, text: str) -> JSON:
    """An input that breaks ``schema``: a required property left out, else a wrong type."""
    root = dict(schema)
    resolved = _resolve(root, root, 0)
    valid = _instance(root, root, _Hints(text), "", 0)
    instance: JSON = dict(valid) if isinstance(valid, dict) else {}
    required = [r for r in resolved.get("required", []) if isinstance(r, str)]
    props = resolved.get("properties") if isinstance(resolved.get("properties"), dict) else {}
    assert isinstance(props, dict)
    if required:
        instance.pop(required[0], None)
        return instance
    for key, sub in props.items():
        instance[key] = _wrong_value(_resolve(sub, root, 0))
        return instance
    if resolved.get("additionalProperties") is False:
        return {"__offline_unexpected__": True}
    return {"__offline_malformed__": True}


# --------------------------------------------------------------------------- the model


def _system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return "\n".join(b.get("text", "") for b in system if isinstance(b, dict))
    return ""


def _text_of(blocks: Sequence[JSON]) -> str:
    return "\n".join(
        b["text"] for b in blocks if b.get("type") == "text" and isinstance(b.get("text"), str)
    )


def _result_text(block: JSON) -> str:
    content = block.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return _text_of([b for b in content if isinstance(b, dict)])
    return ""


def _find_labels(text: str) -> tuple[list[tuple[str, list[str]]], tuple[int, int]] | None:
    """Labels (with their describing words) listed in ``text``, and the span of the list."""
    for m in _LABEL_TRIGGER.finditer(text):
        rest = text[m.end() :]
        line_end = rest.find("\n")
        inline = rest if line_end < 0 else rest[:line_end]
        inline = re.split(r"\.(?:\s|$)", inline, maxsplit=1)[0]
        labels: list[tuple[str, list[str]]] = []
        end = m.end()
        if inline.strip():
            for item in re.split(r",|\||/|\bor\b|;", inline):
                label = item.strip().strip("\"'`*[]()").strip()
                label = re.sub(r"^(?:and|or)\s+", "", label).strip().strip("\"'`*").strip()
                if label and len(label.split()) <= 4:
                    labels.append((label, []))
            end = m.end() + len(inline)
        elif line_end >= 0:
            offset = m.end() + line_end + 1
            for line in text[offset:].split("\n"):
                bullet = re.match(r"\s*(?:[-*•]|\d+[.)])\s+(.+)", line)
                if not bullet:
                    if labels or line.strip():
                        break
                    offset += len(line) + 1
                    continue
                head, _, tail = bullet.group(1).partition(":")
                if not tail:
                    head, _, tail = bullet.group(1).partition(" - ")
                label = head.strip().strip("\"'`*").strip()
                if label:
                    labels.append((label, _keywords(tail)))
                offset += len(line) + 1
            end = offset
        if len(labels) >= 2:
            return labels, (m.start(), end)
    return None


def _schema_in(text: str) -> JSON | None:
    """The first ``{...}`` in ``text`` that parses as a JSON schema object."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, m.start())
        except ValueError:
            continue
        if isinstance(value, dict) and ({"type", "properties", "$schema"} & value.keys()):
            return value
    return None


class OfflineModel:
    """A deterministic responder for Messages API requests (rules in the module docstring)."""

    def respond(self, request: Mapping[str, Any], *, malformed_tool_input: bool = False) -> JSON:
        """The Messages API response body (a dict) for a validated ``request``.

        ``malformed_tool_input`` forces a tool call whose input breaks the tool's schema
        (when the request offers tools). Raises ``InvalidRequestError`` for invalid requests.
        """
        req = dict(request)
        validate_request(req)
        key = _digest(_canonical({k: v for k, v in req.items() if k != "stream"}))
        plan = self._plan(req, malformed_tool_input)
        content: list[JSON] = []
        stop_reason = "end_turn"
        stop_sequence: str | None = None
        if plan[0] == "tool":
            _, tool, tool_input = plan
            content.append(
                {
                    "type": "tool_use",
                    "id": OFFLINE_TOOL_USE_PREFIX + _digest(key, tool["name"]),
                    "name": tool["name"],
                    "input": tool_input,
                }
            )
            stop_reason = "tool_use"
            output = _canonical(tool_input)
            output_tokens = estimate_tokens(output)
        else:
            text = plan[1]
            limit = req["max_tokens"] * CHARS_PER_TOKEN
            cut: int | None = None
            for seq in req.get("stop_sequences") or []:
                pos = text.find(seq) if seq else -1
                if pos >= 0 and pos + len(seq) <= limit and (cut is None or pos < cut):
                    cut, stop_sequence = pos, seq
            if cut is not None:
                text, stop_reason = text[:cut], "stop_sequence"
            elif len(text) > limit:
                text, stop_reason = text[:limit], "max_tokens"
            content.append({"type": "text", "text": text})
            output_tokens = (
                req["max_tokens"]
                if stop_reason == "max_tokens"
                else min(req["max_tokens"], estimate_tokens(text))
            )
        return {
            "id": OFFLINE_MESSAGE_PREFIX + key,
            "type": "message",
            "role": "assistant",
            "model": req["model"],
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": {"input_tokens": count_input_tokens(req), "output_tokens": output_tokens},
        }

    # The plan is ("tool", tool, input) or ("text", text).
    def _plan(self, req: JSON, malformed: bool) -> tuple[Any, ...]:
        messages: list[JSON] = req["messages"]
        users = [m for m in messages if m.get("role") == "user"]
        last_user = _blocks(users[-1]) if users else []
        user_text = _text_of(last_user)
        # Messages with role "system" (this API version allows them) extend the system prompt.
        system = "\n".join(
            [_system_text(req.get("system"))]
            + [_text_of(_blocks(m)) for m in messages if m.get("role") == "system"]
        ).strip()
        tools = [t for t in req.get("tools") or [] if isinstance(t.get("input_schema"), dict)]
        choice = req.get("tool_choice") or {"type": "auto"}
        kind = choice.get("type", "auto")
        if kind == "none":
            tools = []
        # Tool inputs are filled from the latest user text (which a tool_result turn lacks).
        texts = [_text_of(_blocks(m)) for m in users]
        prompt = next((t for t in reversed(texts) if t.strip()), system)

        def call(tool: JSON) -> tuple[Any, ...]:
            schema = tool["input_schema"]
            if malformed:
                return ("tool", tool, _malformed_instance(schema, prompt))
            return ("tool", tool, instance_for_schema(schema, prompt))

        forced: JSON | None = None
        if tools and kind == "tool":
            forced = next(t for t in tools if t["name"] == choice.get("name"))
        elif tools and kind == "any":
            scores = self._tool_scores(tools, prompt)
            forced = tools[scores.index(max(scores))]

        results = [b for b in last_user if b.get("type") == "tool_result"]
        if results:
            names = {
                b.get("id"): b.get("name")
                for m in messages
                if m.get("role") == "assistant"
                for b in _blocks(m)
                if b.get("type") == "tool_use"
            }
            for r in results:
                tool_name = names.get(r.get("tool_use_id"))
                retry = next((t for t in tools if t["name"] == tool_name), None)
                if r.get("is_error") and retry is not None:
                    return call(retry)
            if forced is not None:
                return call(forced)
            summaries = [
                f"Based on the {names.get(r.get('tool_use_id')) or 'tool'} "
                f"{'error' if r.get('is_error') else 'result'}: "
                f"{_compact(_result_text(r), RESULT_SUMMARY_CHARS) or '(empty)'}"
                for r in results
            ]
            return ("text", OFFLINE_TEXT_PREFIX + "; ".join(s.rstrip(".") for s in summaries) + ".")
        if forced is not None:
            return call(forced)
        if tools or malformed:
            candidates = tools or [
                t for t in req.get("tools") or [] if isinstance(t.get("input_schema"), dict)
            ]
            scores = self._tool_scores(candidates, user_text)
            if candidates and (max(scores) > 0 or malformed):
                return call(candidates[scores.index(max(scores))])

        output_config = req.get("output_config")
        fmt = output_config.get("format") if isinstance(output_config, dict) else None
        if (
            isinstance(fmt, dict)
            and fmt.get("type") == "json_schema"
            and isinstance(fmt.get("schema"), dict)
        ):
            return ("text", _canonical_json(instance_for_schema(fmt["schema"], prompt)))
        if _JSON_REQUEST.search(system) or (not system and _JSON_REQUEST.search(user_text)):
            schema = _schema_in(system) or (None if system else _schema_in(user_text))
            if schema is not None:
                return ("text", _canonical_json(instance_for_schema(schema, user_text)))
            answer = strip_offline_marker(self._plain(system, user_text))
            return ("text", _canonical_json({"answer": answer, "offline": True}))
        return ("text", self._plain(system, user_text))

    @staticmethod
    def _tool_scores(tools: Sequence[JSON], text: str) -> list[int]:
        lowered = text.lower()
        text_words = _words(text)
        scores = []
        for tool in tools:
            name = tool["name"]
            score = 0
            if name.lower() in lowered or " ".join(_name_parts(name)) in lowered:
                score += 10
            described = _keywords(
                " ".join(_name_parts(name)) + " " + str(tool.get("description") or "")
            )
            score += _overlap(described, text_words)
            scores.append(score)
        return scores

    @staticmethod
    def _plain(system: str, user_text: str) -> str:
        for in_user_text, source in ((False, system), (True, user_text)):
            found = _find_labels(source)
            if found is None:
                continue
            labels, (start, end) = found
            # Labels listed in the user text are cut out of it before scoring.
            text = user_text[:start] + " " + user_text[end:] if in_user_text else user_text
            options = [_words(label) + extra for label, extra in labels]
            return OFFLINE_TEXT_PREFIX + labels[_best(options, text)][0]
        if not user_text.strip():
            return OFFLINE_TEXT_PREFIX + "Hello."
        keys: list[str] = []
        for w in _keywords(user_text):
            if w not in keys:
                keys.append(w)
        answer = f'Re: "{_compact(user_text, 160)}".'
        if keys:
            answer += " Key terms: " + ", ".join(keys[:5]) + "."
        return OFFLINE_TEXT_PREFIX + answer


def _canonical_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def count_input_tokens(request: Mapping[str, Any]) -> int:
    """The estimated input tokens of a request: its system, messages and tools."""
    return estimate_tokens(
        _canonical([request.get("system"), request.get("messages"), request.get("tools")])
    )


# --------------------------------------------------------------------------- faults and records


FaultKind = Literal["rate_limit", "overloaded", "server_error", "slow", "malformed_tool_input"]


class Fault(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One injected fault, consumed by one ``/v1/messages`` request.

    ``model`` restricts it to requests for that model; ``retry_after`` (seconds) sets the
    ``retry-after`` header (default 1 for ``rate_limit``); ``seconds`` is the delay of
    ``slow``; ``message`` overrides the error message.
    """

    kind: FaultKind
    model: str | None = None
    retry_after: float | None = None
    seconds: float = 1.0
    message: str | None = None


class FaultQueue:
    """A thread-safe FIFO of faults; ``take(model)`` pops the first one that applies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def push(self, *faults: Fault) -> None:
        with self._lock:
            self._faults.extend(faults)

    def extend(self, faults: Sequence[Fault]) -> None:
        self.push(*faults)

    def take(self, model: str | None) -> Fault | None:
        with self._lock:
            for i, fault in enumerate(self._faults):
                if fault.model is None or fault.model == model:
                    return self._faults.pop(i)
        return None

    def pending(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def clear(self) -> int:
        with self._lock:
            count = len(self._faults)
            self._faults.clear()
            return count

    def __len__(self) -> int:
        with self._lock:
            return len(self._faults)


class RecordedRequest(msgspec.Struct):
    """A request the server received: ``status`` is 0 until it is answered."""

    seq: int
    method: str
    path: str
    model: str | None
    body: Any
    status: int = 0
    fault: str | None = None
    #: Wall-clock time (``time.time()``) it arrived.
    received_at: float = 0.0


class RequestLog:
    """Every ``/v1/...`` request received, in order (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[RecordedRequest] = []
        self._seq = 0

    def record(self, method: str, path: str, body: Any) -> RecordedRequest:
        model = body.get("model") if isinstance(body, dict) else None
        with self._lock:
            self._seq += 1
            item = RecordedRequest(
                self._seq,
                method,
                path,
                model if isinstance(model, str) else None,
                body,
                received_at=time.time(),
            )
            self._items.append(item)
            return item

    def all(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._items)

    def messages(self) -> list[RecordedRequest]:
        """Only the ``POST /v1/messages`` calls (the model calls)."""
        return [r for r in self.all() if r.path == "/v1/messages"]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __iter__(self) -> Iterator[RecordedRequest]:
        return iter(self.all())

    def __getitem__(self, index: int) -> RecordedRequest:
        with self._lock:
            return self._items[index]


# --------------------------------------------------------------------------- the HTTP app


_ENCODER = msgspec.json.Encoder()


def _headers(request_id: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {OFFLINE_HEADER: "true", "request-id": request_id, **(extra or {})}


def _error(
    status: int, kind: str, message: str, request_id: str, extra: Mapping[str, str] | None = None
) -> Response:
    body = {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}
    return Response(
        _ENCODER.encode(body), status, _headers(request_id, extra), media_type="application/json"
    )


def _json(value: Any, request_id: str = "", status: int = 200) -> Response:
    return Response(
        _ENCODER.encode(value),
        status,
        {OFFLINE_HEADER: "true", **({"request-id": request_id} if request_id else {})},
        media_type="application/json",
    )


def _sse(message: JSON) -> Iterator[bytes]:
    """The stream of events that accumulates to ``message``."""

    def event(kind: str, data: JSON) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + _ENCODER.encode(data) + b"\n\n"

    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": message["usage"]["input_tokens"], "output_tokens": 1},
    }
    yield event("message_start", {"type": "message_start", "message": start})
    yield event("ping", {"type": "ping"})
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            empty: JSON = {"type": "text", "text": ""}
            pieces = re.findall(r"(?:\S+\s*){1,4}|\s+", block["text"])
            deltas = [{"type": "text_delta", "text": p} for p in pieces]
        else:
            empty = {**block, "input": {}}
            raw = _canonical_json(block["input"])
            half = len(raw) // 2
            deltas = [
                {"type": "input_json_delta", "partial_json": p} for p in (raw[:half], raw[half:])
            ]
        yield event(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": empty},
        )
        for delta in deltas:
            yield event(
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta},
            )
        yield event("content_block_stop", {"type": "content_block_stop", "index": index})
    yield event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {
                "stop_reason": message["stop_reason"],
                "stop_sequence": message["stop_sequence"],
            },
            "usage": {"output_tokens": message["usage"]["output_tokens"]},
        },
    )
    yield event("message_stop", {"type": "message_stop"})


def create_app(
    model: OfflineModel | None = None,
    faults: FaultQueue | None = None,
    requests: RequestLog | None = None,
    stopping: threading.Event | None = None,
) -> FastAPI:
    """The ASGI app of the offline model (routes in the module docstring)."""
    model = model or OfflineModel()
    faults = faults if faults is not None else FaultQueue()
    requests = requests if requests is not None else RequestLog()
    stopping = stopping or threading.Event()
    app = FastAPI(title="agentrt offline model", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.faults = faults
    app.state.requests = requests
    app.state.model = model

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(
            exc.status_code, kind, str(exc.detail), "req_offline_" + _digest(str(request.url))
        )

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok", "offline": True})

    async def accept(request: Request) -> tuple[RecordedRequest, str, Any, Response | None]:
        raw = await request.body()
        body: Any = None
        problem: str | None = None
        try:
            body = msgspec.json.decode(raw) if raw else None
        except msgspec.DecodeError as exc:
            problem = f"Request body is not valid JSON: {exc}"
        record = requests.record(request.method, request.url.path, body)
        request_id = f"req_offline_{record.seq:06d}_{_digest(raw.decode(errors='replace'))[:12]}"
        if not (request.headers.get("x-api-key") or request.headers.get("authorization")):
            return (
                record,
                request_id,
                body,
                _error(401, "authentication_error", "x-api-key header is required", request_id),
            )
        if problem is not None:
            return (
                record,
                request_id,
                body,
                _error(400, "invalid_request_error", problem, request_id),
            )
        return record, request_id, body, None

    def finish(record: RecordedRequest, response: Response) -> Response:
        record.status = response.status_code
        return response

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        record, request_id, body, refused = await accept(request)
        if refused is not None and refused.status_code == 401:
            return finish(record, refused)
        fault = faults.take(record.model)
        malformed = False
        if fault is not None:
            record.fault = fault.kind
            if fault.kind == "rate_limit":
                after = fault.retry_after if fault.retry_after is not None else 1
                return finish(
                    record,
                    _error(
                        429,
                        "rate_limit_error",
                        fault.message
                        or "Number of requests has exceeded your rate limit (offline fault)",
                        request_id,
                        {"retry-after": f"{after:g}"},
                    ),
                )
            extra = (
                {"retry-after": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
            )
            if fault.kind == "overloaded":
                return finish(
                    record,
                    _error(
                        529,
                        "overloaded_error",
                        fault.message or "Overloaded (offline fault)",
                        request_id,
                        extra,
                    ),
                )
            if fault.kind == "server_error":
                return finish(
                    record,
                    _error(
                        500,
                        "api_error",
                        fault.message or "Internal server error (offline fault)",
                        request_id,
                        extra,
                    ),
                )
            if fault.kind == "slow":
                deadline = time.monotonic() + fault.seconds
                while (left := deadline - time.monotonic()) > 0:
                    await asyncio.sleep(min(0.05, left))
                    if stopping.is_set() or await request.is_disconnected():
                        return finish(
                            record, _error(499, "api_error", "client went away", request_id)
                        )
            malformed = fault.kind == "malformed_tool_input"
        if refused is not None:
            return finish(record, refused)
        try:
            message = model.respond(body, malformed_tool_input=malformed)
        except InvalidRequestError as exc:
            return finish(record, _error(400, "invalid_request_error", str(exc), request_id))
        if body.get("stream"):
            record.status = 200
            return StreamingResponse(
                _aiter(list(_sse(message))),
                media_type="text/event-stream",
                headers=_headers(request_id),
            )
        return finish(record, _json(message, request_id))

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        record, request_id, body, refused = await accept(request)
        if refused is not None:
            return finish(record, refused)
        try:
            validate_request(body, count_tokens=True)
        except InvalidRequestError as exc:
            return finish(record, _error(400, "invalid_request_error", str(exc), request_id))
        return finish(record, _json({"input_tokens": count_input_tokens(body)}, request_id))

    @app.get("/_offline/faults")
    async def list_faults() -> Response:
        return _json(msgspec.to_builtins(faults.pending()))

    @app.post("/_offline/faults")
    async def push_faults(request: Request) -> Response:
        raw = await request.body()
        try:
            value = msgspec.json.decode(raw, type=list[Fault] | Fault)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return _error(400, "invalid_request_error", f"faults: {exc}", "req_offline_faults")
        new = value if isinstance(value, list) else [value]
        faults.extend(new)
        return _json({"queued": len(new), "pending": len(faults)})

    @app.delete("/_offline/faults")
    async def clear_faults() -> Response:
        return _json({"cleared": faults.clear()})

    @app.get("/_offline/requests")
    async def list_requests() -> Response:
        return _json(msgspec.to_builtins(requests.all()))

    @app.delete("/_offline/requests")
    async def clear_requests() -> Response:
        requests.clear()
        return _json({"cleared": True})

    return app


# --------------------------------------------------------------------------- running it


def _uvicorn_config(app: FastAPI, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        loop="asyncio",
        ws="none",
        lifespan="off",
        timeout_graceful_shutdown=2,
    )


class OfflineServer:
    """The offline model served by uvicorn on 127.0.0.1 in a background thread.

    Use as ``with OfflineServer() as server:`` or ``async with OfflineServer() as server:``;
    then point the SDK at ``server.base_url``. ``faults`` and ``requests`` are shared with
    the running app. Signal handlers are not installed (uvicorn only installs them on the
    main thread; the server runs on its own).
    """

    def __init__(
        self, model: OfflineModel | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.model = model or OfflineModel()
        self.host = host
        self.port = port
        self.faults = FaultQueue()
        self.requests = RequestLog()
        self._stopping = threading.Event()
        self.app = create_app(self.model, self.faults, self.requests, self._stopping)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._failure: BaseException | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Bind, serve in a thread, and return once ``/healthz`` answers."""
        if self._thread is not None:
            raise RuntimeError("the offline model server is already running")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._socket = sock
        self.port = int(sock.getsockname()[1])
        self._stopping.clear()
        self._failure = None
        server = uvicorn.Server(_uvicorn_config(self.app, self.host, self.port))
        self._server = server

        def run() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException as exc:  # reported by start()/stop(), not lost in the thread
                self._failure = exc

        self._thread = threading.Thread(target=run, name=f"offline-model-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                failure = self._failure
                self.stop()
                raise RuntimeError(f"the offline model server did not start: {failure!r}")
            time.sleep(0.01)
        with httpx.Client(timeout=timeout) as client:
            client.get(f"{self.base_url}/healthz").raise_for_status()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, end slow faults in flight, join the thread, close the socket."""
        self._stopping.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> OfflineServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> OfflineServer:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)


def serve(port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> None:
    """Serve the offline model in the foreground until interrupted (``agentrt offline-model``)."""
    server = uvicorn.Server(_uvicorn_config(create_app(), host, port))
    server.run()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m runtime.offline_model [--host H] [--port N]``."""
    parser = argparse.ArgumentParser(
        prog="agentrt offline-model",
        description="Serve the deterministic offline model (Anthropic Messages API).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    print(f"offline model (Anthropic Messages API) on http://{args.host}:{args.port}", flush=True)
    serve(args.port, args.host)
    return 0


async def _aiter(items: Sequence[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


if __name__ == "__main__":
    raise SystemExit(main())
