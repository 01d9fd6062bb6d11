"""Token estimates without a tokenizer: one token per four characters, at least one.

Shared by the offline model (its ``usage``) and the LLM calls (budget checks); stdlib only.
"""

from __future__ import annotations

import math

__all__ = ["CHARS_PER_TOKEN", "estimate_tokens"]

CHARS_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    """One token per four characters, at least one."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))
