"""The runs table's rows, written in Python for speed: every value from the read model is
escaped, and each row carries what the template used to show."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from projections.queries import RunRow
from projections.ui.pages.runs import table_rows


def _row(**changes: object) -> RunRow:
    now = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    base: dict[str, object] = dict(
        run_id=uuid.UUID(int=7), source="postmark", trigger_type="email.received",
        status="waiting_for_approval", agents=["triage", "desk"], started_at=now,
        finished_at=now, duration_ms=1500.0, error=None, error_type=None, usage={},
        input_tokens=1200, output_tokens=34, cost_usd=0.0123, llm_calls=3, tool_calls=1,
        retries=0, activations=4, events=20, parent_run_id=None, fork_step=None,
        position="1:2", updated_at=now, states={"reviewer": "review"},
    )  # fmt: skip
    base.update(changes)
    return RunRow(**base)  # type: ignore[arg-type]


def test_a_row_shows_the_run() -> None:
    html = str(table_rows([_row()]))
    run_id = str(uuid.UUID(int=7))
    assert f'<a href="/ui/runs/{run_id}" aria-label="Run {run_id}">{run_id[:8]}</a>' in html
    assert '<span class="badge waiting_for_approval">waiting for approval</span>' in html
    assert '<span class="muted">reviewer: review</span>' in html
    for cell in ("email.received", "postmark", "triage, desk", "2026-12-01 09:30:00",
                 "1.5 s", "1,234", "$0.0123"):  # fmt: skip
        assert f">{cell}</td>" in html, cell
    assert "fork</span>" not in html
    forked = str(table_rows([_row(parent_run_id=uuid.UUID(int=9))]))
    assert f'title="forked from {uuid.UUID(int=9)}">fork</span>' in forked


def test_every_value_from_the_read_model_is_escaped() -> None:
    evil = '<script>alert("x")</script>'
    html = str(table_rows([_row(source=evil, trigger_type=evil, agents=[evil],
                                status=evil, states={evil: evil})]))  # fmt: skip
    assert "<script>" not in html
    assert "&lt;script&gt;" in html
    assert 'class="badge &lt;script&gt;' in html  # even in an attribute
