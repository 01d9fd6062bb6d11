"""OpenAPI for msgspec results: their JSON Schemas as components the routes refer to.

FastAPI documents pydantic models by itself; the API encodes msgspec structs (faster,
and the read models are structs already), so their schemas are generated with
``msgspec.json.schema_components`` and merged into the app's document under
``#/components/schemas/<name>``, where each route's ``responses=`` points.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import msgspec
from fastapi import FastAPI

REF = "#/components/schemas/{name}"


def schema_of(tp: Any) -> dict[str, Any]:
    """The schema a route's 200 answer has: a ``$ref`` to ``tp``'s component (or an array
    of them); :func:`install_components` must be given ``tp`` too."""
    (schema,), _ = msgspec.json.schema_components([tp], ref_template=REF)
    return schema


def install_components(app: FastAPI, types: Iterable[Any]) -> None:
    """Make ``app.openapi()`` include the schemas of ``types`` (and of what they refer to)."""
    _, components = msgspec.json.schema_components(list(types), ref_template=REF)
    base: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        doc = base()
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name, schema in components.items():
            schemas.setdefault(name, schema)
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
