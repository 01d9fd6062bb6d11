"""Filter forms as GET query strings: empty fields are no filter, a field that does not
parse is named in ``errors`` (said beside the form, not a 500 or a bare 422)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from uuid import UUID

from fastapi import Request


class Form:
    """The query string's text fields, trimmed, and what did not parse."""

    def __init__(self, request: Request, names: tuple[str, ...]) -> None:
        q = request.query_params
        self.values: dict[str, str] = {n: (q.get(n) or "").strip() for n in names}
        self.errors: dict[str, str] = {}

    def __getitem__(self, name: str) -> str:
        return self.values[name]

    def text(self, name: str, max_length: int = 200) -> str | None:
        value = self.values[name]
        if len(value) > max_length:
            self.errors[name] = f"at most {max_length} characters"
            return None
        return value or None

    def uuid(self, name: str) -> UUID | None:
        value = self.values[name]
        if not value:
            return None
        try:
            return UUID(value)
        except ValueError:
            self.errors[name] = "a run id, like 0193a5c2-7d0e-7c4f-8a1b-2b3c4d5e6f70"
            return None

    def time(self, name: str) -> datetime | None:
        value = self.values[name]
        if not value:
            return None
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            self.errors[name] = "a date and time, like 2026-12-01T09:30"
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)  # the form's are UTC

    def day(self, name: str) -> date | None:
        value = self.values[name]
        if not value:
            return None
        try:
            return date.fromisoformat(value)
        except ValueError:
            self.errors[name] = "a day, like 2026-12-01"
            return None

    def cost(self, name: str) -> float | None:
        """An amount of dollars (a leading ``$`` allowed), 0 or more."""
        value = self.values[name].removeprefix("$")
        if not value:
            return None
        try:
            amount = float(value)
        except ValueError:
            amount = -1.0
        if not 0 <= amount < float("inf"):  # also refuses nan
            self.errors[name] = "a number of dollars, 0 or more"
            return None
        return amount

    def order(self, first: str, last: str, first_value: object, last_value: object) -> None:
        """Say so when the range's start is after its end."""
        if first_value is not None and last_value is not None and first_value > last_value:  # type: ignore[operator]
            self.errors[last] = f"must not be before {first.replace('_', ' ')}"

    def params(self) -> dict[str, str]:
        """The non-empty fields, for links (the next page keeps them)."""
        return {k: v for k, v in self.values.items() if v}


def error_status(request: Request, form: Form) -> int:
    """422 for a page whose filters did not parse; 200 for an htmx fragment saying so (htmx
    treats a 4xx as a failed request: it would log a console error for a message that is
    the answer, shown beside the form)."""
    if not form.errors or request.headers.get("hx-request") == "true":
        return 200
    return 422
