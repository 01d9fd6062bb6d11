"""``scripts/bench_ui.py``: a tiny run's ``--json`` line, and no figure for a page that
does not answer 200."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse

from tests.support import REPO
from tests.support.servers import Servers

SCRIPT = str(REPO / "scripts" / "bench_ui.py")
KEYS = {"name", "value", "unit", "ceiling", "ratio", "target"}


@pytest.fixture(scope="module")
def bench() -> Iterator[object]:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import bench_ui  # type: ignore[import-not-found]

        yield bench_ui
    finally:
        sys.path.remove(str(REPO / "scripts"))


def test_help() -> None:
    done = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for option in ("--quick", "--json", "--write-readme", "--runs", "--events", "--requests"):
        assert option in done.stdout


async def test_a_page_that_is_not_200_html_gets_no_figure(bench: object) -> None:
    app = FastAPI()

    @app.get("/missing")
    async def missing() -> JSONResponse:
        return JSONResponse({"code": "not_found"}, status_code=404)

    @app.get("/json")
    async def not_html() -> JSONResponse:
        return JSONResponse({})

    @app.get("/page")
    async def page() -> HTMLResponse:
        return HTMLResponse("<p>ok</p>")

    info = bench.Info("url", "18")  # type: ignore[attr-defined]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        check = bench.check  # type: ignore[attr-defined]
        assert await check(client, "/missing", {}, "a. run page", info) is None
        assert await check(client, "/json", {}, "a. run page", info) is None
        assert await check(client, "/page", {}, "b. runs table", info) == "<p>ok</p>"
    assert len(info.notes) == 2 and all("gets no figure" in n for n in info.notes), info.notes
    assert "answered 404" in info.notes[0]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_tiny_run_prints_its_figures_as_the_last_json_line(servers: Servers) -> None:
    # PYTHONPATH: this checkout's packages, whatever the virtualenv points at.
    env = dict(os.environ, DATABASE_URL=servers.database_url, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, SCRIPT, "--runs", "300", "--events", "60", "--requests", "3",
         "--repeat", "1", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=160, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(line) == {"figures"}
    figures = {f["name"]: f for f in line["figures"]}
    assert all(set(f) == KEYS for f in figures.values()), figures
    assert len(figures) == 6
    table = figures["b. runs table GET /ui/, a page of 50"]
    assert table["unit"] == "ms" and table["target"] == 100 and table["value"] > 0
    assert table["ceiling"] == figures["b. GET /runs?limit=50 (JSON, baseline)"]["value"] > 0
    assert table["ratio"] == pytest.approx(table["value"] / table["ceiling"], rel=0.01)
    ratio = figures["b. runs table / its JSON"]
    assert ratio["unit"] == "×" and ratio["target"] == 2 and ratio["value"] > 0
    assert "300 synthetic rows COPied" in done.stderr
    run_page = figures["a. run page GET /ui/runs/{id}, 1,000 events"]
    assert run_page["target"] == 200
    if run_page["value"] is None:  # the run page is not there: said, and no figure at all
        assert "gets no figure" in done.stderr, done.stderr[-4000:]
        assert figures["a. run page / its JSON"]["value"] is None
    else:
        assert run_page["value"] > 0 and figures["a. run page / its JSON"]["value"] > 0


async def test_each_side_is_timed_under_its_own_name(bench: object) -> None:
    """The page and the JSON take turns going first; each time must be filed under its own
    side (an earlier version filed by turn, so both medians mixed the two: ratio 1.00)."""
    import asyncio

    app = FastAPI()

    @app.get("/slow")
    async def slow() -> HTMLResponse:
        await asyncio.sleep(0.02)
        return HTMLResponse("<p>slow</p>")

    @app.get("/fast")
    async def fast() -> JSONResponse:
        return JSONResponse({})

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        slow_ms, fast_ms = await bench.alternate(  # type: ignore[attr-defined]
            client, (["/slow"], {}), (["/fast"], {}), 8
        )
    assert slow_ms >= 20 > fast_ms * 4, (slow_ms, fast_ms)
