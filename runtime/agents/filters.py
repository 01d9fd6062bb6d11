"""Event filters: an agent subscribes by predicate as well as by type, the predicate as data.

::

    class RefundDesk(Agent):
        subscribes = (
            On(EmailReceived, where=Where(sender_domain="example.com", subject=r"(?i)refund")),
            On(RowChanged, where=Where(table="orders", pointer="/after/status", equals="paid")),
        )

A :class:`Where` is a msgspec Struct, so the relay, the logs and ``agentrt
agents`` can show it, and its conditions are checked against the event class
when the app loads (a field the type lacks is an error, not a filter that
never matches). Predicates read the body as JSON (``msgspec.to_builtins``), by
JSON pointer: the runtime knows no webhook type, only the event's fields.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import msgspec.inspect as mi

from runtime.events.model import Event

#: What each convenience predicate reads: a JSON pointer into the body.
FIELDS: dict[str, str] = {
    "source": "/source",
    "table": "/table",
    "op": "/op",
    "sender_domain": "/sender/email",
    "subject": "/subject",
}


class Where(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A predicate over an event's body: every condition given must hold.

    * ``source``, ``table``, ``op``: the body's field of that name equals the value;
    * ``sender_domain``: the domain of ``sender.email`` (case-insensitive);
    * ``subject``: a regular expression found (``re.search``) in ``subject``;
    * ``pointer`` and ``equals``: the value at a JSON pointer (RFC 6901, e.g.
      ``/after/status``) equals ``equals`` (JSON equality: ``1`` is not ``true``).

    A body without the field does not match.
    """

    source: str | None = None
    table: str | None = None
    op: str | None = None
    sender_domain: str | None = None
    subject: str | None = None
    pointer: str | None = None
    equals: Any = msgspec.UNSET

    def conditions(self) -> list[tuple[str, str, Any]]:
        """(predicate, JSON pointer, expected) for each condition given."""
        out = [
            (name, path, getattr(self, name))
            for name, path in FIELDS.items()
            if getattr(self, name) is not None
        ]
        if self.pointer is not None:
            out.append(("pointer", self.pointer, self.equals))
        return out

    def matches(self, doc: Any) -> bool:
        """Whether the body (as ``msgspec.to_builtins`` gives it) passes every condition."""
        for name, path, expected in self.conditions():
            found, value = resolve(doc, path)
            if not found:
                return False
            if name == "sender_domain":
                if not isinstance(value, str):
                    return False
                if value.rpartition("@")[2].lower() != str(expected).lower():
                    return False
            elif name == "subject":
                if not isinstance(value, str) or _regex(expected).search(value) is None:
                    return False
            elif not _json_equal(value, expected):
                return False
        return True

    def describe(self) -> str:
        """One line: ``source=postmark subject~/(?i)refund/ /after/status=="paid"``."""
        parts = []
        for name, path, expected in self.conditions():
            if name == "subject":
                parts.append(f"subject~/{expected}/")
            elif name == "pointer":
                shown = "?" if expected is msgspec.UNSET else msgspec.json.encode(expected).decode()
                parts.append(f"{path}=={shown}")
            else:
                parts.append(f"{name}={expected}")
        return " ".join(parts) or "(no condition)"

    def problems(self, event_type: type[Event]) -> list[str]:
        """What is wrong with this filter for ``event_type`` (empty: nothing)."""
        out = []
        if not self.conditions():
            out.append("states no condition (it would match every event: subscribe to the type)")
        if self.pointer is None and self.equals is not msgspec.UNSET:
            out.append("`equals` needs a `pointer` to compare")
        if self.pointer is not None and self.equals is msgspec.UNSET:
            out.append(f"`pointer={self.pointer!r}` needs `equals=` (the value to compare with)")
        if self.subject is not None:
            try:
                _regex(self.subject)
            except re.error as exc:
                out.append(f"subject pattern {self.subject!r} is not a regular expression: {exc}")
        info = mi.type_info(event_type)
        for name, path, _ in self.conditions():
            if path and not path.startswith("/"):
                out.append(f"pointer {path!r} must be empty or start with '/'")
                continue
            try:
                leaves = _leaf_types(info, _parts(path), "")
            except LookupError as exc:
                tag = event_type.__struct_config__.tag
                out.append(f"{name}: {tag} has no {path} ({exc.args[0]})")
                continue
            if name in ("sender_domain", "subject") and not any(
                isinstance(t, mi.StrType | mi.AnyType) for t in leaves
            ):
                out.append(f"{name}: {path} is not text")
        return out


class On(msgspec.Struct, frozen=True):
    """A subscription with filters: ``On(EmailReceived, where=Where(...))``.

    ``where`` is one :class:`Where` or several: an event passes if it matches
    any of them (each one's conditions all hold).
    """

    event: type[Event] | str
    where: Where | Sequence[Where] = ()

    def alternatives(self) -> tuple[Where, ...]:
        w = self.where
        return (w,) if isinstance(w, Where) else tuple(w)


#: Event type -> the filters its events must pass (any one); a type without an
#: entry passes whole.
Filters = Mapping[str, tuple[Where, ...]]


def accepts(filters: Filters, event_type: str, body: Event) -> bool:
    """Whether an event of ``event_type`` passes ``filters``."""
    wheres = filters.get(event_type)
    if not wheres:
        return True
    doc = msgspec.to_builtins(body)
    return any(w.matches(doc) for w in wheres)


def describe(filters: Filters) -> dict[str, list[str]]:
    """The filters as text, for logs and listings."""
    return {t: [w.describe() for w in ws] for t, ws in sorted(filters.items())}


# JSON pointers are hand-read (a few lines): we also walk them over msgspec's type
# information at load time, which no pointer library does.


def _parts(pointer: str) -> list[str]:
    if not pointer:
        return []
    return [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]


def resolve(doc: Any, pointer: str) -> tuple[bool, Any]:
    """(found, value) at ``pointer`` (RFC 6901) in a JSON document."""
    value = doc
    for part in _parts(pointer):
        if isinstance(value, dict):
            if part not in value:
                return False, None
            value = value[part]
        elif isinstance(value, list):
            if not (part.isascii() and part.isdigit()) or int(part) >= len(value):
                return False, None
            value = value[int(part)]
        else:
            return False, None
    return True, value


def _leaf_types(t: Any, parts: list[str], at: str) -> list[Any]:
    """The types a pointer can reach in ``t``; LookupError saying where it cannot go."""
    if not parts:
        return [t]
    head, rest = parts[0], parts[1:]
    here = f"{at}/{head}"
    if isinstance(t, mi.UnionType):
        found: list[Any] = []
        first: LookupError | None = None
        for member in t.types:
            if isinstance(member, mi.NoneType):
                continue
            try:
                found += _leaf_types(member, parts, at)
            except LookupError as exc:
                first = first or exc
        if not found and first is not None:
            raise first
        return found
    if isinstance(t, mi.StructType):
        if t.tag_field == head and not rest:
            return [mi.StrType()]
        for f in t.fields:
            if f.encode_name == head:
                return _leaf_types(f.type, rest, here)
        fields = ", ".join(f.encode_name for f in t.fields)
        raise LookupError(f"{at or 'the body'} has the fields {fields}")
    if isinstance(t, mi.AnyType | mi.DictType):
        return [mi.AnyType()]  # a free-form mapping: any key may be there
    if isinstance(t, mi.ListType | mi.VarTupleType | mi.TupleType):
        if not (head.isascii() and head.isdigit()):
            raise LookupError(f"{at} is a list: {head!r} is not an index")
        if isinstance(t, mi.TupleType):
            if int(head) >= len(t.item_types):
                raise LookupError(f"{at} has {len(t.item_types)} items")
            return _leaf_types(t.item_types[int(head)], rest, here)
        return _leaf_types(t.item_type, rest, here)
    raise LookupError(f"{at} is a {type(t).__name__.removesuffix('Type').lower()}, not an object")


@functools.lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _json_equal(a: Any, b: Any) -> bool:
    # Python's 1 == True is not JSON's: a boolean equals only a boolean.
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)
