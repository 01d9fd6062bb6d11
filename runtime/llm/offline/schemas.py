"""Schema instances: tool inputs and JSON answers generated to validate against a JSON schema.

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

``_malformed_instance`` builds the opposite, for the ``malformed_tool_input`` fault: an input
that breaks the schema (the first required property left out, else a wrong type).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from runtime.llm.offline.common import (
    _STOPWORDS,
    JSON,
    _best,
    _compact,
    _name_parts,
    _word_set,
    _words,
)
from runtime.llm.offline.validation import _is_int, _is_number

__all__ = ["instance_for_schema"]

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

_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w])")
_QUOTED = re.compile(r"\"([^\"\n]{1,200})\"|“([^”\n]{1,200})”|`([^`\n]{1,200})`|'([^'\n]{1,200})'")


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
