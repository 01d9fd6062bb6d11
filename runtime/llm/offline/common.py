"""Constants, offline marks and text helpers shared by the offline model's modules."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

JSON = dict[str, Any]

DEFAULT_PORT = 8765
OFFLINE_HEADER = "x-agentrt-offline"
OFFLINE_TEXT_PREFIX = "[offline] "
OFFLINE_MESSAGE_PREFIX = "msg_offline_"
OFFLINE_TOOL_USE_PREFIX = "toolu_offline_"


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

_WORD = re.compile(r"[a-z0-9]+")


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
