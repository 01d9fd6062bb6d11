"""Tools: schemas from signatures, validation for the model, timeouts, the registry."""

from __future__ import annotations

import asyncio
import enum
import json
import typing
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import anthropic
import msgspec
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from runtime.effects.retry import classify
from runtime.effects.tools import (
    DEFAULT_TIMEOUT,
    IDEMPOTENCY_NAMESPACE,
    Tool,
    ToolContext,
    ToolInputError,
    ToolOutputError,
    ToolRegistry,
    ToolTimeout,
    UnknownTool,
    tool,
)
from runtime.errors import AgentrtError, ErrorCode
from runtime.llm.offline import OfflineServer

# -- sample types and tools (module level: annotations are resolved lazily) ----------


class Priority(enum.Enum):
    LOW = "low"
    HIGH = "high"


class Address(msgspec.Struct):
    """A postal address."""

    street: str
    zip: str | None = None


class Ticket(msgspec.Struct):
    id: str
    title: str
    priority: Priority
    address: Address | None = None


class Circle(msgspec.Struct, tag="circle"):
    radius: float


class Square(msgspec.Struct, tag="square"):
    side: float


class Node(msgspec.Struct):
    value: int
    children: list[Node] = []


@tool
async def create_ticket(
    ctx: ToolContext,
    title: str,
    priority: Priority = Priority.LOW,
    status: Literal["open", "closed"] | None = None,
    address: Address | None = None,
    tags: tuple[str, ...] = (),
) -> Ticket:
    """Open a support ticket.

    This paragraph is for humans only.

    Args:
        title: One line that says what is wrong,
            as the customer would put it.
        priority (Priority): How urgent it is.
        nonexistent: Documented but not a parameter; ignored.

    Returns:
        The new ticket.
    """
    return Ticket(id=ctx.idempotency_key, title=title, priority=priority, address=address)


class Echo(msgspec.Struct, kw_only=True):
    name: str
    count: int
    ratio: float
    flag: bool
    status: Literal["open", "closed"] | None
    priority: Priority
    tags: list[str]
    attrs: dict[str, int]
    when: datetime
    ident: uuid.UUID
    address: Address | None
    shape: Circle | Square


@tool(name="echo-all", description="Return the arguments as they arrived.", timeout=5)
async def echo(
    name: str,
    count: int,
    ratio: float,
    flag: bool,
    status: Literal["open", "closed"] | None,
    priority: Priority,
    tags: list[str],
    attrs: dict[str, int],
    when: datetime,
    ident: uuid.UUID,
    address: Address | None,
    shape: Circle | Square,
) -> Echo:
    return Echo(
        name=name,
        count=count,
        ratio=ratio,
        flag=flag,
        status=status,
        priority=priority,
        tags=tags,
        attrs=attrs,
        when=when,
        ident=ident,
        address=address,
        shape=shape,
    )


RUN = uuid.UUID("0193c1a6-0000-7000-8000-000000000001")


def ctx(step: int = 1) -> ToolContext:
    return ToolContext.for_step(RUN, "act-1", step)


def all_keys(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from all_keys(value)
    elif isinstance(node, list):
        for item in node:
            yield from all_keys(item)


# -- schemas ---------------------------------------------------------------------

ADDRESS_SCHEMA = {
    "title": "Address",
    "description": "A postal address.",
    "type": "object",
    "properties": {
        "street": {"type": "string"},
        "zip": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
    },
    "required": ["street"],
}


def test_the_schema_of_a_rich_signature() -> None:
    assert create_ticket.name == "create_ticket"
    assert create_ticket.description == "Open a support ticket."
    assert create_ticket.timeout == DEFAULT_TIMEOUT
    assert create_ticket.output_type is Ticket
    assert create_ticket.input_schema == {
        "type": "object",
        "properties": {
            "title": {
                "description": "One line that says what is wrong, as the customer would put it.",
                "type": "string",
            },
            "priority": {
                "title": "Priority",
                "enum": ["high", "low"],
                "description": "How urgent it is.",
                "default": "low",
            },
            "status": {"anyOf": [{"enum": ["closed", "open"]}, {"type": "null"}], "default": None},
            "address": {"anyOf": [ADDRESS_SCHEMA, {"type": "null"}], "default": None},
            "tags": {"type": "array", "items": {"type": "string"}, "default": []},
        },
        "required": ["title"],
        "additionalProperties": False,
    }


def test_every_ref_is_inlined() -> None:
    for t in (create_ticket, echo):
        encoded = json.dumps(t.input_schema)
        assert "$ref" not in set(all_keys(t.input_schema))
        assert "$defs" not in encoded
        assert "discriminator" not in set(all_keys(t.input_schema))
    shape = echo.input_schema["properties"]["shape"]
    assert [v["properties"]["type"] for v in shape["anyOf"]] == [
        {"enum": ["circle"]},
        {"enum": ["square"]},
    ]


def test_every_supported_type_has_a_schema() -> None:
    props = echo.input_schema["properties"]
    assert props["count"] == {"type": "integer"}
    assert props["ratio"] == {"type": "number"}
    assert props["flag"] == {"type": "boolean"}
    assert props["attrs"] == {"type": "object", "additionalProperties": {"type": "integer"}}
    assert props["ident"] == {"type": "string", "format": "uuid"}
    assert props["when"] == {"type": "string"}
    assert echo.input_schema["required"] == list(props)  # no defaults, all required


def test_decorator_arguments_and_annotated_metadata() -> None:
    @tool(name="lookup", timeout=2.5)
    async def find(
        query: Annotated[str, msgspec.Meta(min_length=1, description="Words to look for.")],
        limit: Annotated[int, msgspec.Meta(ge=1, le=50)] = 10,
    ) -> list[str]:
        """Look things up.

        Parameters
        ----------
        query : str
            Overridden by the Annotated description.
        limit : int
            At most this many
            results.

        Returns
        -------
        list of str
        """
        return [query] * limit

    assert (find.name, find.timeout, find.description) == ("lookup", 2.5, "Look things up.")
    assert find.input_schema["properties"] == {
        "query": {"description": "Words to look for.", "type": "string", "minLength": 1},
        "limit": {
            "description": "At most this many results.",
            "type": "integer",
            "minimum": 1,
            "maximum": 50,
            "default": 10,
        },
    }


def test_a_tool_without_parameters() -> None:
    @tool
    async def ping() -> str:
        """Say pong."""
        return "pong"

    assert ping.input_schema == {
        "type": "object",
        "properties": {},
        "required": [],
        "additionalProperties": False,
    }
    assert not ping.takes_context


def test_the_anthropic_shape() -> None:
    param = create_ticket.to_anthropic()
    assert set(param) == {"name", "description", "input_schema"}
    assert set(param) <= set(typing.get_type_hints(anthropic.types.ToolParam))
    assert param["input_schema"] == create_ticket.input_schema
    # The SDK's TypedDict (mypy checks the return type; this checks the values).
    assert anthropic.types.ToolParam.__required_keys__ <= set(param)
    assert isinstance(param["name"], str) and isinstance(param.get("description"), str)
    assert isinstance(param["input_schema"], dict) and param["input_schema"]["type"] == "object"
    assert json.loads(json.dumps(param)) == param  # plain JSON, no Python-only values
    # A copy: callers adding cache_control or editing the schema change nothing here.
    schema: Any = param["input_schema"]
    schema["properties"].clear()
    assert create_ticket.input_schema["properties"]


async def test_the_sdk_sends_the_tools_and_its_tool_use_input_invokes() -> None:
    """The real SDK, over HTTP, against the offline model: its tool_use input invokes the tool."""
    registry = ToolRegistry([create_ticket, echo])
    async with (
        OfflineServer() as server,
        anthropic.AsyncAnthropic(
            api_key="offline-test", base_url=server.base_url, max_retries=0
        ) as client,
    ):
        message = await client.messages.create(
            model="claude-test",
            max_tokens=100,
            messages=[{"role": "user", "content": 'Create a ticket: title is "Printer on fire"'}],
            tools=registry.to_anthropic(),
            tool_choice={"type": "tool", "name": "create_ticket"},
        )
        sent = server.requests.messages()[-1].body
    assert sent["tools"] == registry.to_anthropic()
    (use,) = [b for b in message.content if b.type == "tool_use"]
    result = await registry.get(use.name).invoke(ctx(), use.input)
    assert isinstance(result.value, Ticket)
    assert result.value.title == "Printer on fire"


# -- invoking --------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        {"title": "t", "priority": "high", "address": {"street": "Main St 1"}},
        b'{"title": "t", "priority": "high", "address": {"street": "Main St 1"}}',
        '{"title": "t", "priority": "high", "address": {"street": "Main St 1"}}',
    ],
    ids=["dict", "bytes", "str"],
)
async def test_invoke_with_valid_input(raw: Any) -> None:
    result = await create_ticket.invoke(ctx(), raw)
    key = ctx().idempotency_key
    assert result.value == Ticket(
        id=key, title="t", priority=Priority.HIGH, address=Address("Main St 1")
    )
    assert result.data == {
        "id": key,
        "title": "t",
        "priority": "high",
        "address": {"street": "Main St 1", "zip": None},
    }
    # What a replay decodes from the log is what the first run returned.
    recorded = msgspec.json.decode(msgspec.json.encode(result.data))
    assert create_ticket.decode_output(recorded) == result.value


async def test_the_tool_logs_with_the_step_identity() -> None:
    @tool
    async def noisy(ctx: ToolContext) -> None:
        """Log a line."""
        ctx.log.info("working")

    with capture_logs() as logs:
        result = await noisy.invoke(ctx(step=7), {})
    assert result.value is None and result.data is None
    assert logs == [
        {
            "event": "working",
            "log_level": "info",
            "run_id": str(RUN),
            "activation_id": "act-1",
            "step": 7,
            "tool": "noisy",
        }
    ]


async def test_positional_only_and_keyword_only_parameters() -> None:
    @tool
    async def join(a: str, /, b: str = "-", *, c: str) -> str:
        """Join three strings."""
        return a + b + c

    assert (await join.invoke(ctx(), {"a": "x", "c": "z"})).value == "x-z"
    assert join.input_schema["required"] == ["a", "c"]


async def test_dict_keys_survive_the_trip_through_json() -> None:
    @tool
    async def counts(n: int) -> dict[int, str]:
        """Number names."""
        return {i: str(i) for i in range(n)}

    result = await counts.invoke(ctx(), {"n": 2})
    assert result.data == {"0": "0", "1": "1"}
    assert result.value == {0: "0", 1: "1"}


async def test_a_wrong_result_is_a_tool_output_error() -> None:
    @tool
    async def liar() -> int:
        """Claims an int."""
        return "seven"  # type: ignore[return-value]

    @tool
    async def opaque() -> Any:
        """Returns something unencodable."""
        return object()

    with pytest.raises(ToolOutputError, match="Expected `int`, got `str`"):
        await liar.invoke(ctx(), {})
    with pytest.raises(ToolOutputError, match="opaque"):
        await opaque.invoke(ctx(), {})


async def test_calling_the_tool_calls_the_function() -> None:
    ticket = await create_ticket(ctx(), "direct")
    assert ticket.title == "direct" and ticket.priority is Priority.LOW


# -- invalid input ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "path", "message"),
    [
        (
            {"title": 7},
            "$.title",
            "invalid input for tool `create_ticket`: field `title`: expected `str`, got `int`",
        ),
        ({}, "$.title", "field `title`: required field is missing"),
        (
            {"title": "t", "status": "pending"},
            "$.status",
            "field `status`: invalid enum value 'pending' (expected one of: 'closed', 'open')",
        ),
        (
            {"title": "t", "priority": "urgent"},
            "$.priority",
            "field `priority`: invalid enum value 'urgent' (expected one of: 'high', 'low')",
        ),
        (
            {"title": "t", "titel": "t"},
            "$.titel",
            "field `titel`: unknown field "
            "(accepted fields: title, priority, status, address, tags)",
        ),
        (
            {"title": "t", "address": {"zip": "123"}},
            "$.address.street",
            "field `address.street`: required field is missing",
        ),
        (
            {"title": "t", "tags": ["a", 2]},
            "$.tags[1]",
            "field `tags[1]`: expected `str`, got `int`",
        ),
        ({"title": "t", "priority": None}, "$.priority", "expected `str`, got `null`"),
        ('{"title": ', "$", "not valid JSON"),
        ("[]", "$", "invalid input for tool `create_ticket`: expected `object`, got `array`"),
    ],
)
def test_invalid_input_says_where_and_what(raw: Any, path: str, message: str) -> None:
    with pytest.raises(ToolInputError) as caught:
        create_ticket.parse_input(raw)
    assert caught.value.path == path
    assert message in str(caught.value)
    assert caught.value.tool == "create_ticket"
    assert isinstance(caught.value, AgentrtError)
    assert caught.value.code is ErrorCode.TOOL_INPUT


async def test_invalid_input_never_reaches_the_function() -> None:
    calls: list[int] = []

    @tool
    async def counted(n: int) -> int:
        """Count calls."""
        calls.append(n)
        return n

    with pytest.raises(ToolInputError):
        await counted.invoke(ctx(), {"n": "1"})  # strict: a numeric string is not an int
    with pytest.raises(ToolInputError):
        await counted.invoke(ctx(), {"n": True})
    assert calls == []


def test_deep_paths_through_unions_and_dicts() -> None:
    raw = {**_echo_input(), "shape": {"type": "hexagon"}}
    with pytest.raises(ToolInputError) as caught:
        echo.parse_input(raw)
    assert caught.value.path == "$.shape.type"
    assert caught.value.problem == "invalid value 'hexagon' (expected one of: 'circle', 'square')"

    raw = {**_echo_input(), "attrs": {"a": "b"}}
    with pytest.raises(ToolInputError) as caught:
        echo.parse_input(raw)
    assert caught.value.path == "$.attrs[...]"


def _echo_input() -> dict[str, Any]:
    return {
        "name": "n",
        "count": 1,
        "ratio": 0.5,
        "flag": True,
        "status": None,
        "priority": "low",
        "tags": [],
        "attrs": {},
        "when": "2025-01-02T03:04:05Z",
        "ident": str(RUN),
        "address": None,
        "shape": {"type": "circle", "radius": 1.0},
    }


# -- timeouts and cancellation ---------------------------------------------------


@tool(timeout=0.05)
async def sleepy(seconds: float) -> str:
    """Sleep, then answer."""
    await asyncio.sleep(seconds)
    return "awake"


async def test_a_slow_tool_times_out_quickly() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ToolTimeout) as caught:
        await sleepy.invoke(ctx(), {"seconds": 10})
    assert loop.time() - started < 1
    assert (caught.value.tool, caught.value.seconds) == ("sleepy", 0.05)
    assert str(caught.value) == "tool `sleepy` timed out after 0.05s"
    assert isinstance(caught.value, TimeoutError)
    assert isinstance(caught.value, AgentrtError)
    assert classify(caught.value) is not None  # a retryable timeout
    assert (await sleepy.invoke(ctx(), {"seconds": 0})).value == "awake"


async def test_the_tools_own_timeout_error_is_not_ours() -> None:
    @tool
    async def upstream_timeout() -> None:
        """Fails the way an HTTP client does."""
        raise TimeoutError("upstream read timed out")

    with pytest.raises(TimeoutError, match="upstream") as caught:
        await upstream_timeout.invoke(ctx(), {})
    assert not isinstance(caught.value, ToolTimeout)


async def test_errors_from_the_tool_propagate_unchanged() -> None:
    @tool
    async def broken() -> None:
        """Always fails."""
        raise KeyError("nope")

    with pytest.raises(KeyError, match="nope"):
        await broken.invoke(ctx(), {})


async def test_cancellation_propagates() -> None:
    started = asyncio.Event()

    @tool(timeout=60)
    async def waits(ctx: ToolContext) -> None:
        """Wait for a long time."""
        started.set()
        await asyncio.sleep(60)

    task = asyncio.create_task(waits.invoke(ctx(), {}))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


# -- the context -----------------------------------------------------------------


def test_the_idempotency_key_is_stable_and_distinct() -> None:
    key = ctx(step=3).idempotency_key
    assert key == ToolContext.for_step(RUN, "act-1", 3).idempotency_key
    assert key == str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{RUN}:act-1:3"))
    # Pinned: a changed derivation would break idempotency for calls in flight.
    assert key == "2fa240ac-8036-59b8-b250-918d72d64251"
    others = {
        ctx(step=4).idempotency_key,
        ToolContext.for_step(RUN, "act-2", 3).idempotency_key,
        ToolContext.for_step(uuid.uuid4(), "act-1", 3).idempotency_key,
    }
    assert key not in others and len(others) == 3
    assert len(key) == 36


def test_the_context_is_frozen() -> None:
    c = ToolContext(run_id=RUN, activation_id="a", step=0, log=structlog.get_logger())
    with pytest.raises(AttributeError):
        c.step = 1  # type: ignore[misc]


# -- the registry ----------------------------------------------------------------


def test_the_registry() -> None:
    registry = ToolRegistry([create_ticket])
    registry.add(echo)
    assert registry.names == ("create_ticket", "echo-all")
    assert "echo-all" in registry and "nope" not in registry
    assert len(registry) == 2 and list(registry) == [create_ticket, echo]
    assert registry.get("echo-all") is echo
    assert [p["name"] for p in registry.to_anthropic()] == ["create_ticket", "echo-all"]


def test_the_registry_refuses_a_second_tool_of_the_same_name() -> None:
    @tool(name="create_ticket")
    async def impostor() -> None:
        """Another tool of the same name."""

    registry = ToolRegistry([create_ticket])
    with pytest.raises(ValueError, match="'create_ticket' is already registered"):
        registry.add(impostor)
    assert registry.get("create_ticket") is create_ticket


def test_an_unknown_tool_lists_the_known_ones() -> None:
    registry = ToolRegistry([echo, create_ticket])
    with pytest.raises(UnknownTool) as caught:
        registry.get("delete_everything")
    assert caught.value.name == "delete_everything"
    assert caught.value.known == ("create_ticket", "echo-all")
    assert str(caught.value) == (
        "no tool named `delete_everything`; available tools: `create_ticket`, `echo-all`"
    )
    assert caught.value.code is ErrorCode.UNKNOWN_TOOL


# -- definitions refused at decoration time --------------------------------------


class Opaque:
    """A class msgspec knows nothing about."""


async def _untyped(x) -> None:  # type: ignore[no-untyped-def]
    """No annotation."""


async def _no_return(x: int):  # type: ignore[no-untyped-def]
    """No return annotation."""


async def _object(x: object) -> None:
    """A bare object."""


async def _opaque(ctx: ToolContext, x: Opaque) -> None:
    """An unsupported class."""


async def _opaque_result() -> Opaque:
    """An unsupported result."""
    return Opaque()


async def _late_context(x: int, ctx: ToolContext) -> None:
    """Context not first."""


async def _varargs(*xs: int) -> None:
    """Varargs."""


async def _recursive(tree: Node) -> None:
    """A recursive struct."""


async def _undefined(x: NotDefinedAnywhere) -> None:  # type: ignore[name-defined]  # noqa: F821
    """An annotation that does not resolve."""


async def _mutable_default(xs: list[int] = [1]) -> None:  # noqa: B006
    """A shared default."""


def _sync(x: int) -> None:
    """Not async."""


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (_untyped, "parameter 'x' needs a type annotation"),
        (_no_return, "the return value needs an annotation"),
        (_object, "parameter 'x': <class 'object'> is not a type msgspec can describe"),
        (_opaque, "parameter 'x': <class 'tests.runtime.effects.test_tools.Opaque'> is not a type"),
        (
            _opaque_result,
            "the return annotation: <class 'tests.runtime.effects.test_tools.Opaque'>",
        ),
        (_late_context, "parameter 'ctx': a ToolContext must be the first parameter"),
        (_varargs, "parameter 'xs': \\*args and \\*\\*kwargs"),
        (_recursive, "parameter 'tree': recursive type 'Node'"),
        (_undefined, "cannot resolve its annotations: name 'NotDefinedAnywhere'"),
        (_mutable_default, "parameter 'xs': a non-empty mutable default"),
        (_sync, "must be an `async def` function"),
    ],
)
def test_bad_definitions_are_type_errors(fn: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        tool(fn)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "has space"}, "must match"),
        ({"name": "x" * 65}, "must match"),
        ({"timeout": 0}, "timeout must be a positive"),
        ({"timeout": float("nan")}, "timeout must be a positive"),
        ({"description": "  "}, "needs a description"),
    ],
)
def test_bad_settings_are_value_errors(kwargs: dict[str, Any], match: str) -> None:
    async def fine(x: int) -> int:
        """Fine."""
        return x

    with pytest.raises(ValueError, match=match):
        tool(**kwargs)(fine)


def test_a_tool_needs_a_description() -> None:
    async def mute(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="'mute' needs a description"):
        tool(mute)
    assert tool(description="Echo x.")(mute).description == "Echo x."


# -- the round trip law ----------------------------------------------------------

texts = st.text(max_size=20)
addresses = st.builds(Address, street=texts, zip=st.none() | texts)
shapes = st.one_of(
    st.builds(Circle, radius=st.floats(allow_nan=False, allow_infinity=False)),
    st.builds(Square, side=st.floats(allow_nan=False, allow_infinity=False)),
)
echo_inputs = st.builds(
    echo.input_type,
    name=texts,
    count=st.integers(min_value=-(2**63), max_value=2**64 - 1),
    ratio=st.floats(allow_nan=False, allow_infinity=False),
    flag=st.booleans(),
    status=st.from_type(Literal["open", "closed"] | None),  # type: ignore[arg-type]
    priority=st.sampled_from(Priority),
    tags=st.lists(texts, max_size=3),
    attrs=st.dictionaries(texts, st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=3),
    when=st.datetimes(timezones=st.none() | st.just(UTC)),
    ident=st.uuids(),
    address=st.none() | addresses,
    shape=shapes,
)


def test_valid_inputs_round_trip() -> None:
    """For any valid input, sent as the model would (JSON) or as a dict, invoke returns it."""
    with asyncio.Runner() as runner:

        @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(params=echo_inputs, as_json=st.booleans())
        def check(params: msgspec.Struct, as_json: bool) -> None:
            fields = msgspec.structs.asdict(params)
            raw = msgspec.json.encode(params) if as_json else msgspec.to_builtins(params)
            result = runner.run(echo.invoke(ctx(), raw))
            assert result.value == Echo(**fields)
            assert result.data == msgspec.to_builtins(Echo(**fields))
            assert echo.decode_output(json.loads(json.dumps(result.data))) == result.value

        check()


def test_a_tool_is_typed_for_mypy() -> None:
    # Not a runtime check: keeps the generic parameters honest for the type checker.
    t: Tool[..., Ticket] = create_ticket
    assert t.name == "create_ticket"
