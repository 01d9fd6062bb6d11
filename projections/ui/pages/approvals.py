"""(to be written)"""

from __future__ import annotations

from fastapi import APIRouter

from projections.ui.app import UI


def routes(r: APIRouter, ui: UI) -> None:
    pass
