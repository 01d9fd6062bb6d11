"""The offline model through the real `anthropic` SDK: answers, tools, limits, errors, faults."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, Literal

import anthropic
import httpx
import jsonschema_rs
import msgspec
import pytest
from anthropic.types import MessageParam, TextBlockParam, ToolChoiceParam, ToolParam

from runtime.llm.offline import (
    OFFLINE_HEADER,
    Fault,
    OfflineModel,
    OfflineServer,
    instance_for_schema,
    is_offline_message,
    strip_offline_marker,
)

MODEL = "claude-offline-test"

WEATHER: ToolParam = {
    "name": "get_weather",
    "description": "Get the current weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "minLength": 2},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "unit", "days"],
    },
}

ORDER: ToolParam = {
    "name": "lookup_order",
    "description": "Look up a customer order by its id",
    "input_schema": {
        "type": "object",
        "properties": {
            "order_id": {"type": "integer", "minimum": 1},
            "email": {"type": "string", "format": "email"},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "options": {
                "type": "object",
                "properties": {"include_history": {"type": "boolean"}},
                "required": ["include_history"],
                "additionalProperties": False,
            },
            "note": {"type": "string"},
        },
        "required": ["order_id", "email", "tags", "options"],
        "additionalProperties": False,
    },
}


class OrderOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_history: bool


class LookupOrder(msgspec.Struct, forbid_unknown_fields=True):
    """The ORDER tool's input, as the code receiving it would decode it."""

    order_id: int
    email: str
    tags: list[str]
    options: OrderOptions
    note: str | None = None


class Weather(msgspec.Struct, forbid_unknown_fields=True):
    city: str
    unit: Literal["celsius", "fahrenheit"]
    days: int


def schema_valid(schema: Mapping[str, object], instance: Any) -> bool:
    return bool(jsonschema_rs.validator_for(dict(schema)).is_valid(instance))


def user(text: str) -> list[MessageParam]:
    return [{"role": "user", "content": text}]


def tool_result(
    use_id: str, text: str, *, is_error: bool = False, as_blocks: bool = False
) -> MessageParam:
    content: str | list[TextBlockParam] = [{"type": "text", "text": text}] if as_blocks else text
    return {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": use_id, "content": content, "is_error": is_error}
        ],
    }


@pytest.fixture(scope="module")
def server() -> Iterator[OfflineServer]:
    with OfflineServer() as s:
        yield s


@pytest.fixture(autouse=True)
def clean_faults(server: OfflineServer) -> Iterator[None]:
    server.faults.clear()
    yield
    server.faults.clear()


@pytest.fixture
async def client(server: OfflineServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    c = anthropic.AsyncAnthropic(api_key="offline-test", base_url=server.base_url, max_retries=0)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def http(server: OfflineServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as c:
        yield c


# --------------------------------------------------------------------------- answers


async def test_text_answer_is_deterministic_and_marked_offline(
    client: anthropic.AsyncAnthropic,
) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 200,
        "messages": user("Summarize the quarterly revenue report for the board"),
    }
    first = await client.messages.with_raw_response.create(**kwargs)
    second = await client.messages.with_raw_response.create(**kwargs)
    assert first.http_response.content == second.http_response.content
    assert first.headers[OFFLINE_HEADER] == "true"
    assert first.headers["request-id"].startswith("req_offline_")
    message = await first.parse()
    assert message.id.startswith("msg_offline_")
    assert is_offline_message(message)
    assert message.model == MODEL
    assert message.role == "assistant"
    assert message.stop_reason == "end_turn"
    assert message.stop_sequence is None
    assert len(message.content) == 1
    block = message.content[0]
    assert block.type == "text"
    assert block.text.startswith("[offline] ")
    assert "quarterly" in block.text
    assert message.usage.input_tokens > 0
    assert message.usage.output_tokens > 0
    # A different request is a different message.
    other = await client.messages.create(
        model=MODEL, max_tokens=200, messages=user("Something else entirely")
    )
    assert other.id != message.id


async def test_system_as_blocks_and_other_params_are_accepted(
    client: anthropic.AsyncAnthropic,
) -> None:
    message = await client.messages.create(
        model=MODEL,
        max_tokens=100,
        system=[{"type": "text", "text": "You are terse."}],
        metadata={"user_id": "u-1"},
        messages=user("hello"),
    )
    assert message.content[0].type == "text"
    assert message.content[0].text.startswith("[offline] ")


@pytest.mark.parametrize(
    ("system", "text", "label"),
    [
        (
            "Classify the ticket. Reply with one of: billing, support, spam.",
            "I was charged twice, refund my bill",
            "billing",
        ),
        (
            "Classify the ticket. Reply with one of: billing, support, spam.",
            "The app shows an error, I need support",
            "support",
        ),
        ("Classify the ticket. Reply with one of: billing, support, spam.", "hmm", "billing"),
        (
            "Route the message to a team. Categories:\n"
            "- billing: invoices, refunds, payments\n"
            "- engineering: bugs, errors, crashes\n"
            "- sales: pricing, quotes, demos",
            "The dashboard crashes with an error on login",
            "engineering",
        ),
    ],
)
async def test_classification_picks_a_label(
    client: anthropic.AsyncAnthropic, system: str, text: str, label: str
) -> None:
    message = await client.messages.create(
        model=MODEL, max_tokens=20, system=system, messages=user(text)
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == f"[offline] {label}"
    assert strip_offline_marker(message.content[0].text) == label


async def test_classification_from_the_user_text(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(
        model=MODEL,
        max_tokens=20,
        messages=user("Is this spam? 'You won a prize' Choose from: ham, spam"),
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == "[offline] spam"


async def test_system_role_messages_extend_the_system_prompt(
    client: anthropic.AsyncAnthropic,
) -> None:
    message = await client.messages.create(
        model=MODEL,
        max_tokens=20,
        messages=[
            {"role": "system", "content": "Reply with one of: billing, support, spam."},
            {"role": "user", "content": "Please refund the duplicate bill"},
        ],
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == "[offline] billing"


async def test_tool_use_input_validates_against_the_schema(
    client: anthropic.AsyncAnthropic,
) -> None:
    message = await client.messages.create(
        model=MODEL,
        max_tokens=300,
        tools=[WEATHER, ORDER],
        messages=user("Where is my order 4521? My email is bob@example.com"),
    )
    assert message.stop_reason == "tool_use"
    assert len(message.content) == 1
    block = message.content[0]
    assert block.type == "tool_use"
    assert block.name == "lookup_order"
    assert block.id.startswith("toolu_offline_")
    assert schema_valid(ORDER["input_schema"], block.input)
    decoded = msgspec.convert(block.input, LookupOrder)
    assert decoded.order_id == 4521
    assert decoded.email == "bob@example.com"


async def test_tool_choice_auto_picks_by_name_or_description(
    client: anthropic.AsyncAnthropic,
) -> None:
    weather = await client.messages.create(
        model=MODEL,
        max_tokens=300,
        tools=[ORDER, WEATHER],
        messages=user("How is the weather in Lisbon, in fahrenheit, for 3 days?"),
    )
    block = weather.content[0]
    assert block.type == "tool_use"
    assert block.name == "get_weather"
    assert msgspec.convert(block.input, Weather) == Weather("Lisbon", "fahrenheit", 3)
    # Nothing in the text matches a tool: a text answer.
    plain = await client.messages.create(
        model=MODEL,
        max_tokens=300,
        tools=[ORDER, WEATHER],
        messages=user("hello there"),
    )
    assert plain.stop_reason == "end_turn"
    assert plain.content[0].type == "text"
    # tool_choice none never calls a tool.
    none = await client.messages.create(
        model=MODEL,
        max_tokens=300,
        tools=[WEATHER],
        tool_choice={"type": "none"},
        messages=user("weather in Lisbon"),
    )
    assert none.content[0].type == "text"


CHOICES: list[ToolChoiceParam] = [{"type": "any"}, {"type": "tool", "name": "lookup_order"}]


@pytest.mark.parametrize("choice", CHOICES)
async def test_forced_tool_choice_always_calls_with_valid_input(
    client: anthropic.AsyncAnthropic, choice: ToolChoiceParam
) -> None:
    message = await client.messages.create(
        model=MODEL,
        max_tokens=300,
        tools=[ORDER, WEATHER],
        tool_choice=choice,
        messages=user("hi"),
    )
    block = message.content[0]
    assert block.type == "tool_use"
    schema = ORDER if block.name == "lookup_order" else WEATHER
    assert schema_valid(schema["input_schema"], block.input)


async def test_a_tool_result_is_answered_in_text(client: anthropic.AsyncAnthropic) -> None:
    messages: list[MessageParam] = user("Where is order 77?")
    first = await client.messages.create(
        model=MODEL,
        max_tokens=300,
        tools=[ORDER],
        messages=messages,
    )
    use = first.content[0]
    assert use.type == "tool_use"
    messages += [
        first.to_param(),
        tool_result(use.id, "Order 77 shipped Monday via DHL.", as_blocks=True),
    ]
    answer = await client.messages.create(
        model=MODEL,
        max_tokens=300,
        tools=[ORDER],
        messages=messages,
    )
    assert answer.stop_reason == "end_turn"
    assert answer.content[0].type == "text"
    text = answer.content[0].text
    assert text.startswith("[offline] Based on the lookup_order result")
    assert "shipped Monday via DHL" in text


async def test_max_tokens_truncates(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(
        model=MODEL,
        max_tokens=3,
        messages=user("Write a long essay about the history of event sourcing in banking"),
    )
    assert message.stop_reason == "max_tokens"
    assert message.content[0].type == "text"
    assert len(message.content[0].text) <= 3 * 4
    assert message.usage.output_tokens == 3


async def test_stop_sequences_cut_the_text(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(
        model=MODEL,
        max_tokens=200,
        stop_sequences=["Key terms"],
        messages=user("Describe the outbox relay"),
    )
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == "Key terms"
    assert message.content[0].type == "text"
    assert "Key terms" not in message.content[0].text


async def test_structured_output_is_valid_json(client: anthropic.AsyncAnthropic) -> None:
    schema = {
        "type": "object",
        "properties": {
            "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "reasons": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["sentiment", "score", "reasons"],
    }
    message = await client.messages.create(
        model=MODEL,
        max_tokens=300,
        system=f"Respond with JSON matching this schema: {json.dumps(schema)}",
        messages=user("Terrible, negative experience with the support team"),
    )
    assert message.content[0].type == "text"
    value = json.loads(message.content[0].text)
    assert schema_valid(schema, value)
    assert value["sentiment"] == "negative"
    # Without a schema: a JSON object with the answer, marked offline.
    loose = await client.messages.create(
        model=MODEL, max_tokens=300, system="Respond with JSON only.", messages=user("hi")
    )
    assert loose.content[0].type == "text"
    assert json.loads(loose.content[0].text)["offline"] is True


def test_schema_instances_cover_refs_unions_and_bounds() -> None:
    schema = {
        "$defs": {
            "Item": {
                "type": "object",
                "properties": {"sku": {"type": "string"}},
                "required": ["sku"],
            }
        },
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 2},
            "count": {"anyOf": [{"type": "null"}, {"type": "integer", "exclusiveMinimum": 5}]},
            "ratio": {"type": "number", "maximum": 0.5, "minimum": 0.1},
            "code": {"type": "string", "minLength": 8, "maxLength": 10},
            "when": {"type": "string", "format": "date-time"},
            "kind": {"const": "fixed"},
            "flag": {"type": ["boolean", "null"]},
        },
        "required": ["items", "count", "ratio", "code", "when", "kind", "flag"],
    }
    value = instance_for_schema(schema, 'sku "ABC-1" please')
    assert schema_valid(schema, value)
    assert value["items"][0]["sku"] == "ABC-1"
    assert instance_for_schema(schema, 'sku "ABC-1" please') == value


def test_the_model_is_pure() -> None:
    request = {"model": MODEL, "max_tokens": 50, "messages": user("ping")}
    model = OfflineModel()
    assert model.respond(request) == OfflineModel().respond(dict(request))
    assert model.respond({**request, "stream": True}) == model.respond(request)


# --------------------------------------------------------------------------- streaming


async def test_streaming_accumulates_to_the_same_message(client: anthropic.AsyncAnthropic) -> None:
    for kwargs in (
        {"messages": user("Stream a short answer about Redis streams please")},
        {"messages": user("weather in Oslo"), "tools": [WEATHER]},
    ):
        created = await client.messages.create(model=MODEL, max_tokens=200, **kwargs)
        async with client.messages.stream(model=MODEL, max_tokens=200, **kwargs) as stream:
            streamed = await stream.get_final_message()
        assert streamed.model_dump() == created.model_dump()


# --------------------------------------------------------------------------- invalid requests


async def test_missing_max_tokens_is_a_400_naming_the_field(
    client: anthropic.AsyncAnthropic,
) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.post(
            "/v1/messages", body={"model": MODEL, "messages": user("hi")}, cast_to=object
        )
    err = caught.value
    assert err.status_code == 400
    assert err.type == "invalid_request_error"
    assert err.api_message == "max_tokens: Field required"
    assert err.request_id is not None
    assert err.request_id.startswith("req_offline_")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"max_tokens": 5, "messages": user("hi")}, "model: Field required"),
        ({"model": MODEL, "max_tokens": 5}, "messages: Field required"),
        ({"model": MODEL, "max_tokens": 0, "messages": user("hi")}, "max_tokens"),
        ({"model": MODEL, "max_tokens": 5, "messages": []}, "messages"),
        (
            {"model": MODEL, "max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]},
            "messages.0.role",
        ),
        (
            {"model": MODEL, "max_tokens": 5, "messages": user("x"), "tools": [{"name": "t"}]},
            "tools.0.input_schema",
        ),
        (
            {
                "model": MODEL,
                "max_tokens": 5,
                "messages": user("x"),
                "tools": [WEATHER],
                "tool_choice": {"type": "tool", "name": "nope"},
            },
            "tool_choice.name",
        ),
        (
            {
                "model": MODEL,
                "max_tokens": 5,
                "messages": [
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x"}]}
                ],
            },
            "tool_use_id",
        ),
    ],
)
async def test_invalid_requests_name_the_field(
    http: httpx.AsyncClient, body: dict[str, Any], needle: str
) -> None:
    response = await http.post("/v1/messages", json=body, headers={"x-api-key": "k"})
    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert needle in error["error"]["message"]
    assert response.headers["request-id"] == error["request_id"]
    assert response.headers[OFFLINE_HEADER] == "true"


async def test_missing_api_key_is_a_401(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/messages", json={"model": MODEL, "max_tokens": 5, "messages": user("x")}
    )
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


async def test_unknown_path_is_a_404_in_the_api_shape(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


async def test_count_tokens(client: anthropic.AsyncAnthropic) -> None:
    counted = await client.messages.count_tokens(model=MODEL, messages=user("count these words"))
    message = await client.messages.create(
        model=MODEL, max_tokens=20, messages=user("count these words")
    )
    assert counted.input_tokens == message.usage.input_tokens > 0


# --------------------------------------------------------------------------- faults


async def test_rate_limit_fault_raises_rate_limit_error_with_retry_after(
    client: anthropic.AsyncAnthropic, server: OfflineServer
) -> None:
    server.faults.push(Fault("rate_limit", retry_after=7))
    with pytest.raises(anthropic.RateLimitError) as caught:
        await client.messages.create(model=MODEL, max_tokens=20, messages=user("hi"))
    err = caught.value
    assert err.status_code == 429
    assert err.response.headers["retry-after"] == "7"
    assert err.response.headers[OFFLINE_HEADER] == "true"
    assert err.type == "rate_limit_error"
    assert err.request_id is not None


async def test_overloaded_fault_raises_overloaded_error(
    client: anthropic.AsyncAnthropic, server: OfflineServer
) -> None:
    server.faults.push(Fault("overloaded"))
    with pytest.raises(anthropic.OverloadedError) as caught:
        await client.messages.create(model=MODEL, max_tokens=20, messages=user("hi"))
    assert caught.value.status_code == 529
    assert caught.value.type == "overloaded_error"
    assert isinstance(caught.value, anthropic.InternalServerError)


async def test_server_error_fault_raises_internal_server_error(
    client: anthropic.AsyncAnthropic, server: OfflineServer
) -> None:
    server.faults.push(Fault("server_error"))
    with pytest.raises(anthropic.InternalServerError) as caught:
        await client.messages.create(model=MODEL, max_tokens=20, messages=user("hi"))
    assert caught.value.status_code == 500
    assert caught.value.type == "api_error"
    assert not isinstance(caught.value, anthropic.OverloadedError)


async def test_slow_fault_times_the_client_out(
    client: anthropic.AsyncAnthropic, server: OfflineServer
) -> None:
    server.faults.push(Fault("slow", seconds=5))
    with pytest.raises(anthropic.APITimeoutError):
        await client.messages.create(model=MODEL, max_tokens=20, messages=user("hi"), timeout=0.5)
    message = await client.messages.create(
        model=MODEL, max_tokens=20, messages=user("hi"), timeout=5
    )
    assert message.content[0].type == "text"


async def test_slow_fault_within_the_timeout_answers(
    client: anthropic.AsyncAnthropic, server: OfflineServer
) -> None:
    server.faults.push(Fault("slow", seconds=0.2))
    message = await client.messages.create(model=MODEL, max_tokens=20, messages=user("hi"))
    assert message.stop_reason == "end_turn"


async def test_malformed_tool_input_breaks_the_schema_and_reflection_repairs_it(
    client: anthropic.AsyncAnthropic, server: OfflineServer
) -> None:
    server.faults.push(Fault("malformed_tool_input"))
    messages: list[MessageParam] = user("Look up order 12 for ann@example.com")
    bad = await client.messages.create(
        model=MODEL,
        max_tokens=300,
        tools=[ORDER],
        messages=messages,
    )
    block = bad.content[0]
    assert block.type == "tool_use"
    assert bad.stop_reason == "tool_use"
    assert not schema_valid(ORDER["input_schema"], block.input)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(block.input, LookupOrder)
    # The validation error fed back to the model (reflection) gets a valid call.
    messages += [
        bad.to_param(),
        tool_result(block.id, "Object missing required field `order_id`", is_error=True),
    ]
    fixed = await client.messages.create(
        model=MODEL,
        max_tokens=300,
        tools=[ORDER],
        messages=messages,
    )
    repaired = fixed.content[0]
    assert repaired.type == "tool_use"
    assert repaired.name == "lookup_order"
    assert msgspec.convert(repaired.input, LookupOrder).order_id == 12


async def test_faults_are_consumed_one_per_request(
    client: anthropic.AsyncAnthropic, server: OfflineServer
) -> None:
    server.faults.push(Fault("rate_limit"), Fault("server_error"))
    with pytest.raises(anthropic.RateLimitError):
        await client.messages.create(model=MODEL, max_tokens=20, messages=user("hi"))
    with pytest.raises(anthropic.InternalServerError):
        await client.messages.create(model=MODEL, max_tokens=20, messages=user("hi"))
    assert len(server.faults) == 0
    message = await client.messages.create(model=MODEL, max_tokens=20, messages=user("hi"))
    assert message.stop_reason == "end_turn"


async def test_a_fault_for_one_model_waits_for_that_model(
    client: anthropic.AsyncAnthropic, server: OfflineServer
) -> None:
    server.faults.push(Fault("overloaded", model="claude-big"))
    small = await client.messages.create(model="claude-small", max_tokens=20, messages=user("hi"))
    assert small.model == "claude-small"
    assert len(server.faults) == 1
    with pytest.raises(anthropic.OverloadedError):
        await client.messages.create(model="claude-big", max_tokens=20, messages=user("hi"))
    assert len(server.faults) == 0


async def test_the_sdk_retries_a_fault_and_succeeds(server: OfflineServer) -> None:
    server.faults.push(Fault("rate_limit", retry_after=0.01), Fault("overloaded"))
    before = len(server.requests.messages())
    async with anthropic.AsyncAnthropic(
        api_key="offline-test", base_url=server.base_url, max_retries=2
    ) as retrying:
        message = await retrying.messages.create(model=MODEL, max_tokens=20, messages=user("retry"))
    assert message.content[0].type == "text"
    calls = server.requests.messages()[before:]
    assert [(c.status, c.fault) for c in calls] == [
        (429, "rate_limit"),
        (529, "overloaded"),
        (200, None),
    ]


async def test_requests_are_recorded(
    client: anthropic.AsyncAnthropic, server: OfflineServer
) -> None:
    before = len(server.requests)
    await client.messages.create(model=MODEL, max_tokens=20, messages=user("count me"))
    await client.messages.count_tokens(model=MODEL, messages=user("count me"))
    recorded = server.requests.all()[before:]
    assert [(r.method, r.path, r.status) for r in recorded] == [
        ("POST", "/v1/messages", 200),
        ("POST", "/v1/messages/count_tokens", 200),
    ]
    assert recorded[0].model == MODEL
    assert recorded[0].body["messages"] == user("count me")
    assert recorded[1].seq == recorded[0].seq + 1


async def test_fault_and_request_endpoints_over_http(
    client: anthropic.AsyncAnthropic, server: OfflineServer, http: httpx.AsyncClient
) -> None:
    queued = await http.post(
        "/_offline/faults",
        json=[{"kind": "rate_limit", "retry_after": 3}, {"kind": "server_error", "model": "other"}],
    )
    assert queued.status_code == 200
    assert queued.json() == {"queued": 2, "pending": 2}
    pending = (await http.get("/_offline/faults")).json()
    assert [f["kind"] for f in pending] == ["rate_limit", "server_error"]
    with pytest.raises(anthropic.RateLimitError) as caught:
        await client.messages.create(model=MODEL, max_tokens=20, messages=user("hi"))
    assert caught.value.response.headers["retry-after"] == "3"
    cleared = await http.delete("/_offline/faults")
    assert cleared.json() == {"cleared": 1}
    assert len(server.faults) == 0
    refused = await http.post("/_offline/faults", json=[{"kind": "meteor_strike"}])
    assert refused.status_code == 400
    assert refused.json()["error"]["type"] == "invalid_request_error"
    recorded = (await http.get("/_offline/requests")).json()
    assert recorded[-1]["path"] == "/v1/messages"
    assert recorded[-1]["status"] == 429
    assert recorded[-1]["fault"] == "rate_limit"
    assert (await http.delete("/_offline/requests")).status_code == 200
    assert len(server.requests) == 0


# --------------------------------------------------------------------------- the server


async def test_async_context_manager_starts_and_stops_cleanly() -> None:
    async with OfflineServer() as local:
        port = local.port
        assert (await asyncio_get(f"{local.base_url}/healthz"))["offline"] is True
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))


async def asyncio_get(url: str) -> Any:
    async with httpx.AsyncClient(timeout=5) as c:
        response = await c.get(url)
        assert response.headers[OFFLINE_HEADER] == "true"
        return response.json()
