"""Request validation: what the Messages API would refuse with 400 ``invalid_request_error``."""

from __future__ import annotations

from typing import Any, TypeGuard

from runtime.errors import InvalidRequestError
from runtime.llm.offline.common import JSON

__all__ = ["InvalidRequestError", "validate_request"]


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
