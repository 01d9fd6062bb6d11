"""Token estimates without a tokenizer: one token per four characters, at least one.

Shared by the offline model (its ``usage``) and the LLM calls (budget checks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

__all__ = ["CHARS_PER_TOKEN", "estimate_request_tokens", "estimate_tokens", "message_tokens"]

CHARS_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    """One token per four characters, at least one."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def estimate_request_tokens(request: Mapping[str, Any]) -> int:
    """Input tokens of a request, estimated as one per four characters of its JSON."""
    return estimate_tokens(_json(request))


def message_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    return estimate_tokens(_json(messages))


_encoder = msgspec.json.Encoder()


def _json(value: Any) -> str:
    return _encoder.encode(value).decode()
