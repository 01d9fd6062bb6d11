"""The log against a plain in-memory model, driven by hypothesis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from runtime.errors import ConcurrencyConflict, DuplicateEventMismatch
from runtime.events.model import START, LogPosition, NewEvent
from runtime.log.migrations import migrate
from runtime.log.pool import open_runtime_pool
from runtime.log.store import ANY_VERSION, EventLog
from runtime.settings import Settings
from tests.support.events import Noted
from tests.support.servers import Servers, drop_schema, fresh_schema

STREAMS = st.sampled_from(["a", "b", "c"])
TEXTS = st.text(max_size=20)


class IgnoresExpectedVersion(EventLog):
    """A deliberately broken log: it appends whatever the stream's version."""

    async def append(
        self, stream_id: str, events: Any, expected_version: Any = None, **kw: Any
    ) -> Any:
        return await super().append(stream_id, events, ANY_VERSION, **kw)


def test_log_behaves_like_a_list_per_stream(servers: Servers) -> None:
    run_model(servers, EventLog, max_examples=25)


def test_model_catches_a_log_that_ignores_expected_versions(servers: Servers) -> None:
    with pytest.raises(AssertionError):
        run_model(servers, IgnoresExpectedVersion, max_examples=25)


def run_model(servers: Servers, log_cls: type[EventLog], max_examples: int) -> None:
    class LogMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.runner = asyncio.Runner()
            self.schema = fresh_schema()
            cfg = Settings.from_env({}, db_schema=self.schema).with_urls(
                redis_url=servers.redis_url, database_url=servers.database_url
            )

            async def setup() -> EventLog:
                await migrate(cfg)
                return log_cls(await open_runtime_pool(cfg, max_size=2), schema=self.schema)

            self.log = self.runner.run(setup())
            self.streams: dict[str, list[NewEvent]] = {}
            self.order: list[NewEvent] = []
            self.batches: list[tuple[str, list[NewEvent], list[LogPosition]]] = []

        def run(self, coro: Any) -> Any:
            return self.runner.run(coro)

        def teardown(self) -> None:
            async def close() -> None:
                await self.log.pool.close()
                await drop_schema(servers.database_url, self.schema)

            self.run(close())
            self.runner.close()

        @initialize()
        def start(self) -> None:
            pass

        @rule(
            stream=STREAMS,
            texts=st.lists(TEXTS, min_size=1, max_size=4),
            mode=st.sampled_from(["exact", "any", "wrong"]),
            offset=st.integers(min_value=1, max_value=3),
        )
        def append(self, stream: str, texts: list[str], mode: str, offset: int) -> None:
            current = len(self.streams.get(stream, []))
            expected = {"exact": current, "any": ANY_VERSION, "wrong": current + offset}[mode]
            batch = [NewEvent(body=Noted(text=t, n=i)) for i, t in enumerate(texts)]
            try:
                result = self.run(self.log.append(stream, batch, expected))
            except ConcurrencyConflict as exc:
                assert mode == "wrong"
                assert (exc.expected, exc.actual) == (expected, current)
                return
            assert mode != "wrong"
            assert result.inserted
            assert result.stream_version == current + len(batch)
            self.streams.setdefault(stream, []).extend(batch)
            self.order.extend(batch)
            self.batches.append((stream, batch, result.positions))

        @rule(data=st.data())
        def reappend(self, data: st.DataObject) -> None:
            if not self.batches:
                return
            stream, batch, positions = data.draw(st.sampled_from(self.batches))
            expected = data.draw(st.sampled_from([ANY_VERSION, 0, 999]))
            result = self.run(self.log.append(stream, batch, expected))
            assert not result.inserted
            assert result.positions == positions

        @rule(data=st.data(), text=TEXTS)
        def reappend_with_extra(self, data: st.DataObject, text: str) -> None:
            if not self.batches:
                return
            stream, batch, _ = data.draw(st.sampled_from(self.batches))
            try:
                self.run(self.log.append(stream, [*batch, NewEvent(body=Noted(text=text))]))
            except DuplicateEventMismatch:
                return
            raise AssertionError("a partly stored batch was accepted")

        @rule(stream=STREAMS, from_version=st.integers(min_value=1, max_value=12))
        def read_stream(self, stream: str, from_version: int) -> None:
            got = self.run(self.log.read_stream(stream, from_version))
            want = self.streams.get(stream, [])[from_version - 1 :]
            assert [e.event_id for e in got] == [e.event_id for e in want]
            assert [e.body for e in got] == [e.body for e in want]
            assert [e.stream_version for e in got] == list(
                range(from_version, from_version + len(want))
            )

        @rule(page=st.integers(min_value=1, max_value=7))
        def read_all_in_pages(self, page: int) -> None:
            seen = []
            position = START
            while batch := self.run(self.log.read_all(position, page)):
                assert len(batch) <= page
                seen.extend(batch)
                position = batch[-1].log_position
            assert [e.event_id for e in seen] == [e.event_id for e in self.order]

        @invariant()
        def versions_match(self) -> None:
            for stream in ("a", "b", "c"):
                got = self.run(self.log.stream_version(stream))
                assert got == len(self.streams.get(stream, []))

    run_state_machine_as_test(
        LogMachine,
        settings=settings(
            max_examples=max_examples,
            stateful_step_count=15,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
