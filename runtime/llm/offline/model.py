"""The offline model's rules: a deterministic answer for every valid Messages API request.

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

Tool inputs and JSON instances come from ``runtime.llm.offline.schemas``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from runtime.llm.offline.common import (
    JSON,
    OFFLINE_MESSAGE_PREFIX,
    OFFLINE_TEXT_PREFIX,
    OFFLINE_TOOL_USE_PREFIX,
    _best,
    _canonical,
    _compact,
    _digest,
    _keywords,
    _name_parts,
    _overlap,
    _words,
    strip_offline_marker,
)
from runtime.llm.offline.schemas import _malformed_instance, instance_for_schema
from runtime.llm.offline.validation import _blocks, validate_request
from runtime.llm.tokens import CHARS_PER_TOKEN, estimate_tokens

__all__ = ["OfflineModel", "count_input_tokens"]

RESULT_SUMMARY_CHARS = 300
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
