"""Tools: typed async functions that agents call, with a JSON Schema derived from the signature.

A tool is an ``async def`` whose parameters and return value are annotated
with types msgspec understands::

    @tool
    async def search_orders(
        ctx: ToolContext,
        customer_id: str,
        limit: int = 10,
        status: Literal["open", "closed"] | None = None,
    ) -> list[Order]: ...

The decorator turns it into a :class:`Tool`, described by the first paragraph
of its docstring (its parameters by an ``Args:`` or NumPy ``Parameters``
section). The parameters, all but a first ``ctx: ToolContext``, become a
``msgspec.Struct`` built with ``msgspec.defstruct``: its JSON Schema, with
every ``$ref`` inlined, is the ``input_schema`` the Anthropic Messages API
takes, and ``msgspec.convert`` into the same Struct validates what the model
sends. Schema and validator cannot disagree: they come from one type.

Decisions, so that callers can rely on them:

- Validation is strict: ``"10"`` is not an ``int``. Unknown top-level fields
  are refused (the schema says ``additionalProperties: false``); a misspelt
  argument is more often a mistake to reflect on than noise to ignore. Nested
  Structs keep their own ``forbid_unknown_fields`` setting.
- Every problem with a tool's *definition* is found at decoration time: a
  sync function, a missing or unsupported annotation (``TypeError`` naming the
  parameter), a recursive Struct (its schema cannot be inlined), a bad name or
  timeout, a missing description (``ValueError``). Models choose tools by their
  descriptions, so a tool without one is refused.
- :meth:`Tool.invoke` raises :class:`ToolInputError` when the input does not
  validate (its message is written for the model), :class:`ToolTimeout` when
  the call outlives ``tool.timeout``, and :class:`ToolOutputError` when the
  result does not fit the return annotation. Whatever the function itself
  raises propagates unchanged, and ``asyncio.CancelledError`` always does.
- :class:`ToolTimeout` is also a ``TimeoutError``, so ``runtime.retry.classify``
  treats it as a retryable timeout, like any other timeout. A ``TimeoutError``
  raised by the tool itself (its HTTP client's, say) is not converted.
- The result is recorded as plain data (``ToolResult.data``, from
  ``msgspec.to_builtins``) and the typed value handed back is decoded *from
  that data*, exactly as a replay from the log will decode it, so the first
  run and a replay see the same value.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import inspect
import re
import typing
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Generic, ParamSpec, TypeVar, overload

import msgspec
import structlog
from structlog.typing import FilteringBoundLogger

from runtime.errors import ToolInputError, ToolOutputError, ToolTimeout, UnknownTool

if TYPE_CHECKING:
    # Only annotations: importing the SDK costs two seconds at every `agentrt` start.
    import anthropic.types

__all__ = [
    "DEFAULT_TIMEOUT",
    "IDEMPOTENCY_NAMESPACE",
    "Tool",
    "ToolContext",
    "ToolInputError",
    "ToolOutputError",
    "ToolRegistry",
    "ToolResult",
    "ToolTimeout",
    "UnknownTool",
    "tool",
]

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_TIMEOUT = 30.0
"""Seconds a tool call may take unless its decorator says otherwise."""

IDEMPOTENCY_NAMESPACE = uuid.UUID("5b0c1f3e-6a2d-4f57-9a43-2f1d0e7c8b91")
"""uuid5 namespace of :attr:`ToolContext.idempotency_key`. Never change it:
keys already sent to external APIs would stop matching their retries."""

TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
"""What the Anthropic API accepts as a tool name."""

log = structlog.get_logger(__name__)


# -- errors --------------------------------------------------------------------
# The codes are the closest existing ones until errors.py gains TOOL_INPUT,
# TOOL_OUTPUT, TOOL_TIMEOUT and UNKNOWN_TOOL (these classes then move there).


# -- the context -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolContext:
    """What a tool knows about the call it is serving; the runtime builds one per step.

    ``step`` numbers the durable steps of one activation (one agent handling
    one event of a run), so (``run_id``, ``activation_id``, ``step``) names
    this call, and names it again when the step is retried or replayed.
    """

    run_id: uuid.UUID
    activation_id: str
    step: int
    log: FilteringBoundLogger
    """Bound with ``run_id``, ``activation_id``, ``step`` and, inside a tool, ``tool``."""
    key_scope: str = ""
    """What the idempotency key is scoped to (default ``activation_id``): the worker passes
    the first activation of (agent, event), so a redrive, which is a new activation,
    sends the same key per step as the original."""

    @classmethod
    def for_step(
        cls,
        run_id: uuid.UUID,
        activation_id: str,
        step: int,
        *,
        logger: FilteringBoundLogger | None = None,
        key_scope: str = "",
    ) -> ToolContext:
        """A context whose logger is bound with the step's identity."""
        base: FilteringBoundLogger = log if logger is None else logger
        bound = base.bind(run_id=str(run_id), activation_id=activation_id, step=step)
        return cls(run_id=run_id, activation_id=activation_id, step=step, log=bound,
                   key_scope=key_scope)  # fmt: skip

    @property
    def idempotency_key(self) -> str:
        """A key to send with side effects (``Idempotency-Key`` headers, request ids).

        ``uuid5(IDEMPOTENCY_NAMESPACE, f"{run_id}:{key_scope}:{step}")`` as a
        string (``key_scope`` is the activation id of the event's first
        activation): the same for every attempt, redrive and replay of this
        step, different for any other step, and 36 characters, which every API
        we know accepts (a raw concatenation can outgrow 64-character limits).
        """
        name = f"{self.run_id}:{self.key_scope or self.activation_id}:{self.step}"
        return str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, name))


# -- the tool --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolResult(Generic[R]):
    """What a call returned: ``data`` to record, ``value`` decoded from it."""

    value: R
    """The typed result, decoded from ``data`` as a replay would decode it."""
    data: Any
    """JSON-compatible builtins (dicts with str keys, lists, str, int, float, bool, None)."""


@dataclass(frozen=True, eq=False, slots=True)
class Tool(Generic[P, R]):
    """A typed async function with the schema and validation that let a model call it.

    Build one with :func:`tool`. Calling the object calls the function as is
    (no validation, no timeout), which is handy in the tool's own tests;
    the runtime uses :meth:`invoke`.
    """

    fn: Callable[P, Awaitable[R]]
    name: str
    description: str
    input_type: type[msgspec.Struct]
    """The Struct the parameters make; ``parse_input`` returns one."""
    input_schema: dict[str, Any]
    """Self-contained JSON Schema of the input (no ``$ref``); treat it as read-only."""
    output_type: Any
    timeout: float
    takes_context: bool
    positional: tuple[str, ...]
    """Parameters the function takes positionally only."""

    def __repr__(self) -> str:
        return f"<Tool {self.name}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R]:
        return self.fn(*args, **kwargs)

    def to_anthropic(self) -> anthropic.types.ToolParam:
        """The entry for ``tools=[...]`` in ``client.messages.create``."""
        return {
            "name": self.name,
            "description": self.description,
            "input_schema": copy.deepcopy(self.input_schema),
        }

    def parse_input(self, raw: Mapping[str, Any] | bytes | str) -> msgspec.Struct:
        """Validate the model's input (a ``tool_use`` block's ``input``, or its JSON)."""
        try:
            if isinstance(raw, bytes | str):
                return msgspec.json.decode(raw, type=self.input_type)
            return msgspec.convert(raw, self.input_type)
        except msgspec.ValidationError as exc:
            raise self._input_error(str(exc)) from None
        except msgspec.DecodeError as exc:
            raise ToolInputError(self.name, f"not valid JSON: {_lower_first(str(exc))}") from None

    async def invoke(
        self, ctx: ToolContext, raw_input: Mapping[str, Any] | bytes | str
    ) -> ToolResult[R]:
        """Validate ``raw_input``, call the tool under its timeout, and convert the result."""
        value, data = await self._call(self.parse_input(raw_input), lambda: ctx)
        return ToolResult(value=value, data=data)

    async def call(self, params: msgspec.Struct, context: Callable[[], ToolContext]) -> Any:
        """Call the tool with already validated ``params`` under its timeout; its result as
        JSON-ready data (what a step records). ``context`` is asked for the
        :class:`ToolContext` only if the tool takes one."""
        return (await self._call(params, context))[1]

    async def _call(
        self, params: msgspec.Struct, context: Callable[[], ToolContext]
    ) -> tuple[R, Any]:
        """The typed result and its JSON-ready data."""
        args: list[Any] = []
        if self.takes_context:
            ctx = context()
            args.append(dataclasses.replace(ctx, log=ctx.log.bind(tool=self.name)))
        kwargs: dict[str, Any] = {}
        for field in params.__struct_fields__:
            if field in self.positional:
                args.append(getattr(params, field))
            else:
                kwargs[field] = getattr(params, field)
        deadline = asyncio.timeout(self.timeout)
        try:
            async with deadline:
                value = await self.fn(*args, **kwargs)
        except TimeoutError as exc:
            if deadline.expired():
                raise ToolTimeout(self.name, self.timeout) from exc
            raise  # the tool's own timeout: its error, not ours
        try:
            data = msgspec.to_builtins(value, str_keys=True)
        except TypeError as exc:
            raise ToolOutputError(self.name, str(exc)) from None
        # The result must come back as its declared type (a replay decodes the record):
        # a value that does not is the tool's error, found now, not at the replay.
        return self.decode_output(data), data

    def decode_output(self, data: Any) -> R:
        """The typed result for recorded ``data`` (what a replay hands back)."""
        try:
            return typing.cast(R, msgspec.convert(data, self.output_type, str_keys=True))
        except msgspec.ValidationError as exc:
            raise ToolOutputError(self.name, str(exc)) from None

    def _input_error(self, message: str) -> ToolInputError:
        problem, path = message, "$"
        if m := _AT_PATH.match(message):
            problem, path = m["problem"], m["path"]
        if m := _FIELD_PROBLEM.match(problem):
            # Point at the field itself and say which ones exist at the top.
            path = f"{path}.{m['field']}"
            if m["kind"] == "missing required":
                problem = "required field is missing"
            else:
                problem = "unknown field"
                if path.count(".") == 1 and "[" not in path:
                    known = ", ".join(self.input_type.__struct_fields__) or "none"
                    problem += f" (accepted fields: {known})"
        elif problem.startswith(("Invalid enum value", "Invalid value")) and (
            allowed := _enum_values(_schemas_at(self.input_schema, path))
        ):
            problem += f" (expected one of: {', '.join(map(repr, allowed))})"
        return ToolInputError(self.name, _lower_first(problem), path)

    @classmethod
    def from_function(
        cls,
        fn: Callable[P, Awaitable[R]],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Tool[P, R]:
        """Derive a tool from ``fn``; see the module docstring for what is refused."""
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"a tool must be an `async def` function, not {fn!r}")
        name = fn.__name__ if name is None else name
        if not TOOL_NAME.match(name):
            raise ValueError(f"tool name {name!r} must match {TOOL_NAME.pattern}")
        if not 0 < timeout < float("inf"):
            raise ValueError(f"tool {name!r}: timeout must be a positive number of seconds")
        summary, arg_docs = _parse_docstring(inspect.getdoc(fn) or "")
        description = summary if description is None else description.strip()
        if not description:
            raise ValueError(f"tool {name!r} needs a description (a docstring or description=)")
        try:
            hints = typing.get_type_hints(fn, include_extras=True)
        except (NameError, TypeError, AttributeError, SyntaxError) as exc:
            raise TypeError(f"tool {name!r}: cannot resolve its annotations: {exc}") from exc

        params = list(inspect.signature(fn).parameters.values())
        takes_context = bool(params) and _is_context(hints.get(params[0].name))
        if takes_context:
            params = params[1:]
        fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
        positional: list[str] = []
        for p in params:
            fields.append(_field(name, p, hints, arg_docs.get(p.name)))
            if p.kind is inspect.Parameter.POSITIONAL_ONLY:
                positional.append(p.name)
        if "return" not in hints:
            raise TypeError(f"tool {name!r}: the return value needs an annotation")
        output_type = hints["return"]
        _check_schema(name, "the return annotation", output_type)

        input_type = msgspec.defstruct(
            f"{name}_input", fields, kw_only=True, forbid_unknown_fields=True, module=fn.__module__
        )
        return cls(
            fn=fn,
            name=name,
            description=description,
            input_type=input_type,
            input_schema=_input_schema(name, input_type),
            output_type=output_type,
            timeout=float(timeout),
            takes_context=takes_context,
            positional=tuple(positional),
        )


@overload
def tool(fn: Callable[P, Awaitable[R]], /) -> Tool[P, R]: ...


@overload
def tool(
    *, name: str | None = None, description: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> Callable[[Callable[P, Awaitable[R]]], Tool[P, R]]: ...


def tool(
    fn: Callable[P, Awaitable[R]] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Tool[P, R] | Callable[[Callable[P, Awaitable[R]]], Tool[P, R]]:
    """Make a :class:`Tool` of an async function: ``@tool`` or ``@tool(name=..., timeout=...)``.

    ``name`` defaults to the function's name, ``description`` to the first
    paragraph of its docstring; parameter descriptions come from an
    ``Args:`` (Google) or ``Parameters`` (NumPy) section.
    """

    def decorate(f: Callable[P, Awaitable[R]]) -> Tool[P, R]:
        return Tool.from_function(f, name=name, description=description, timeout=timeout)

    return decorate if fn is None else decorate(fn)


# -- the registry ----------------------------------------------------------------


class ToolRegistry:
    """The tools an agent may call, by name, in the order they were added."""

    def __init__(self, tools: Iterable[Tool[..., Any]] = ()) -> None:
        self._tools: dict[str, Tool[..., Any]] = {}
        for t in tools:
            self.add(t)

    def add(self, t: Tool[..., Any]) -> Tool[..., Any]:
        """Register ``t``; a second tool with the same name is a ``ValueError``."""
        if t.name in self._tools:
            raise ValueError(f"a tool named {t.name!r} is already registered")
        self._tools[t.name] = t
        return t

    def get(self, name: str) -> Tool[..., Any]:
        """The tool called ``name``, or :class:`UnknownTool` (say, the model made one up)."""
        try:
            return self._tools[name]
        except KeyError:
            raise UnknownTool(name, self._tools) from None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tools)

    def to_anthropic(self) -> list[anthropic.types.ToolParam]:
        return [t.to_anthropic() for t in self._tools.values()]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool[..., Any]]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)


# -- deriving the schema ---------------------------------------------------------

_AT_PATH = re.compile(r"^(?P<problem>.*) - at `(?P<path>\$[^`]*)`$", re.DOTALL)
_FIELD_PROBLEM = re.compile(
    r"^Object (?P<kind>missing required|contains unknown) field `(?P<field>.*)`$"
)


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _is_context(annotation: Any) -> bool:
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation is ToolContext


def _field(
    tool_name: str, p: inspect.Parameter, hints: Mapping[str, Any], doc: str | None
) -> tuple[str, Any] | tuple[str, Any, Any]:
    where = f"tool {tool_name!r}: parameter {p.name!r}"
    if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
        raise TypeError(f"{where}: *args and **kwargs cannot be described to a model")
    if p.name not in hints:
        raise TypeError(f"{where} needs a type annotation")
    annotation = hints[p.name]
    if _is_context(annotation):
        raise TypeError(f"{where}: a ToolContext must be the first parameter")
    _check_schema(tool_name, f"parameter {p.name!r}", annotation)
    if doc and not _has_description(annotation):
        annotation = Annotated[annotation, msgspec.Meta(description=doc)]
    if p.default is inspect.Parameter.empty:
        return (p.name, annotation)
    if isinstance(p.default, list | dict | set | bytearray) and p.default:
        raise TypeError(f"{where}: a non-empty mutable default is shared between calls")
    return (p.name, annotation, p.default)


def _has_description(annotation: Any) -> bool:
    if typing.get_origin(annotation) is not Annotated:
        return False
    return any(
        isinstance(m, msgspec.Meta) and m.description is not None for m in annotation.__metadata__
    )


def _check_schema(tool_name: str, what: str, annotation: Any) -> None:
    try:
        msgspec.json.schema(annotation)
    except (TypeError, ValueError) as exc:
        reason = str(exc).splitlines()[-1]
        raise TypeError(
            f"tool {tool_name!r}: {what}: {annotation!r} is not a type msgspec can describe "
            f"({reason})"
        ) from exc


def _input_schema(tool_name: str, input_type: type[msgspec.Struct]) -> dict[str, Any]:
    """The Struct's JSON Schema as one object schema, every ``$ref`` replaced by its target."""
    full = msgspec.json.schema(input_type)
    defs: dict[str, Any] = full.get("$defs", {})
    top = defs[full["$ref"].removeprefix("#/$defs/")]
    properties: dict[str, Any] = {}
    for field, schema in top["properties"].items():
        try:
            properties[field] = _inline(schema, defs, ())
        except _Recursive as exc:
            raise TypeError(
                f"tool {tool_name!r}: parameter {field!r}: recursive type {exc.name!r} "
                "cannot be inlined in a tool schema"
            ) from None
    schema = {
        "type": "object",
        "properties": properties,
        "required": list(top.get("required", [])),
        "additionalProperties": False,
    }
    # msgspec leaves some defaults as Python values (a tuple, a frozenset): make it plain JSON.
    return typing.cast(dict[str, Any], msgspec.json.decode(msgspec.json.encode(schema)))


class _Recursive(Exception):
    """A signal inside :func:`_inline`: this definition contains itself."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs"})
_SCHEMA_LISTS = frozenset({"anyOf", "allOf", "oneOf", "prefixItems"})
_SCHEMA_VALUES = frozenset({"items", "additionalProperties", "not", "contains"})


def _inline(schema: Any, defs: Mapping[str, Any], seen: tuple[str, ...]) -> Any:
    """Replace ``$ref`` with copies of the definitions; walks schema keywords only.

    ``discriminator`` (msgspec's OpenAPI hint for tagged unions) is dropped:
    it points into ``$defs``, and each variant's tag already says the same.
    A definition met again inside itself raises :class:`_Recursive`.
    """
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    ref = schema.get("$ref")
    if ref is not None:
        name = ref.removeprefix("#/$defs/")
        if name in seen:
            raise _Recursive(name)
        out.update(_inline(defs[name], defs, (*seen, name)))
    for key, value in schema.items():
        if key in ("$ref", "discriminator"):
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {k: _inline(v, defs, seen) for k, v in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [_inline(v, defs, seen) for v in value]
        elif key in _SCHEMA_VALUES:
            out[key] = _inline(value, defs, seen)
        else:
            out[key] = value
    return out


_PATH_STEP = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")


def _variants(schema: Any) -> Iterator[dict[str, Any]]:
    """``schema`` and, recursively, the members of its ``anyOf`` / ``oneOf``."""
    if isinstance(schema, dict):
        yield schema
        for key in ("anyOf", "oneOf"):
            for member in schema.get(key, ()):
                yield from _variants(member)


def _schemas_at(schema: dict[str, Any], path: str) -> list[Any]:
    """The (inlined) schemas a msgspec error path such as ``$.items[2].sku`` can point at."""
    nodes: list[Any] = [schema]
    for field, index in _PATH_STEP.findall(path.removeprefix("$")):
        found: list[Any] = []
        for v in (v for node in nodes for v in _variants(node)):
            if field:
                found.append(v.get("properties", {}).get(field))
            elif index == "...":
                found.append(v.get("additionalProperties"))
            elif "prefixItems" in v:
                found.extend(v["prefixItems"][int(index) : int(index) + 1])
            else:
                found.append(v.get("items"))
        nodes = [f for f in found if isinstance(f, dict)]
    return nodes


def _enum_values(schemas: list[Any]) -> list[Any]:
    values = [value for s in schemas for v in _variants(s) for value in v.get("enum", ())]
    return list(dict.fromkeys(values))


# -- docstrings ------------------------------------------------------------------

_GOOGLE_ARGS = re.compile(r"^(Args|Arguments|Parameters|Params):\s*$")
_GOOGLE_ENTRY = re.compile(r"^\*{0,2}(?P<name>\w+)\s*(\([^)]*\))?\s*:\s*(?P<text>.*)$")
_NUMPY_ENTRY = re.compile(r"^(?P<name>\w+)\s*(:.*)?$")
_UNDERLINE = re.compile(r"^\s*-{3,}\s*$")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The first paragraph, and per-parameter text from a Google or NumPy section."""
    lines = doc.splitlines()
    summary: list[str] = []
    for line in lines:
        if not line.strip() or _GOOGLE_ARGS.match(line):
            break
        summary.append(line.strip())
    params: dict[str, list[str]] = {}
    for i, line in enumerate(lines):
        if _GOOGLE_ARGS.match(line):
            _google_args(lines[i + 1 :], params)
            break
        if line.strip() == "Parameters" and i + 1 < len(lines) and _UNDERLINE.match(lines[i + 1]):
            _numpy_args(lines[i + 2 :], params)
            break
    return " ".join(summary), {k: " ".join(v) for k, v in params.items() if v}


def _google_args(lines: list[str], params: dict[str, list[str]]) -> None:
    indent: int | None = None
    current: list[str] | None = None
    for line in lines:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:
            return  # the next section
        if indent is None:
            indent = depth
        if depth == indent and (m := _GOOGLE_ENTRY.match(line.strip())):
            current = params.setdefault(m["name"], [])
            if m["text"]:
                current.append(m["text"].strip())
        elif depth > indent and current is not None:
            current.append(line.strip())


def _numpy_args(lines: list[str], params: dict[str, list[str]]) -> None:
    current: list[str] | None = None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if i + 1 < len(lines) and _UNDERLINE.match(lines[i + 1]):
            return  # the next section
        if not line[0].isspace():
            m = _NUMPY_ENTRY.match(line.strip())
            current = params.setdefault(m["name"], []) if m else None
        elif current is not None:
            current.append(line.strip())
