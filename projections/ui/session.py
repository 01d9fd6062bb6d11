"""The run explorer's sign-in: the API's bearer token, exchanged once for a session cookie.

Sessions are stateless (several API processes share nothing but the token): the cookie is
``issued.nonce.signature``, signed with a key derived from the API token (HMAC-SHA256), so
a new token signs everyone out. It is HttpOnly (no script reads it), SameSite=Strict (no
other site's page sends it), scoped to ``/ui`` and Secure behind HTTPS.

Every state-changing request (POST) carries a CSRF token, derived from the session's
nonce: htmx sends it as the ``X-CSRF-Token`` header (set once on ``<body>``), plain forms
as the ``csrf`` field. A POST without it, or with another session's, is refused (403)
before its handler runs. The sign-in form itself is guarded the same way by a
double-submit cookie (there is no session yet to derive a token from).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

#: The session cookie, and the sign-in form's double-submit cookie.
COOKIE = "agentrt_session"
LOGIN_COOKIE = "agentrt_login"
#: Where the cookies are sent: the UI's routes only (never the JSON API's).
PATH = "/ui"
#: How long a session lasts (seconds): a working day.
LIFETIME = 12 * 3600
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@dataclass(frozen=True)
class Session:
    """A signed-in browser: when it signed in, and its CSRF token."""

    issued: int
    nonce: str
    csrf: str


class Sessions:
    """Issue and check session cookies and CSRF tokens for one API token."""

    def __init__(self, token: str | None, *, lifetime: int = LIFETIME) -> None:
        self._token = token.encode() if token else None
        # A key of its own (not the token itself): a leaked cookie signature says nothing
        # about the token, and the same token's JSON-API use is unaffected.
        self._key = hmac.new(self._token or b"", b"agentrt-ui-session-v1", hashlib.sha256).digest()
        self.lifetime = lifetime

    @property
    def configured(self) -> bool:
        return self._token is not None

    def token_matches(self, given: str) -> bool:
        """``given`` is the API token (compared in constant time)."""
        return self._token is not None and hmac.compare_digest(given.strip().encode(), self._token)

    def _sign(self, text: str) -> str:
        return _b64(hmac.new(self._key, text.encode(), hashlib.sha256).digest())

    def issue(self, now: float | None = None) -> tuple[str, Session]:
        """A new session: the cookie's value and the session it names."""
        issued = int(time.time() if now is None else now)
        nonce = secrets.token_urlsafe(18)
        body = f"{issued}.{nonce}"
        return f"{body}.{self._sign(body)}", self._session(issued, nonce)

    def _session(self, issued: int, nonce: str) -> Session:
        return Session(issued, nonce, self._sign(f"csrf.{nonce}"))

    def check(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie names, or None (missing, forged, expired, no token)."""
        if not cookie or self._token is None:
            return None
        parts = cookie.split(".")
        # ASCII digits only ("²".isdigit() holds), and few of them: int() of thousands of
        # digits raises; a forged cookie must be refused, never a 500.
        if len(parts) != 3 or not (parts[0].isascii() and parts[0].isdigit()):
            return None
        if len(parts[0]) > 12 or not parts[1].isascii() or not parts[2].isascii():
            return None
        issued, nonce, signature = int(parts[0]), parts[1], parts[2]
        expected = self._sign(f"{issued}.{nonce}")
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            return None
        age = (time.time() if now is None else now) - issued
        # A minute's grace both ways for the clocks of several API hosts.
        if not -60 <= age < self.lifetime + 60:
            return None
        return self._session(issued, nonce)

    @staticmethod
    def login_nonce() -> str:
        """The sign-in form's double-submit value (its cookie and its hidden field)."""
        return secrets.token_urlsafe(18)

    @staticmethod
    def same(given: str, expected: str) -> bool:
        return bool(given) and hmac.compare_digest(
            given.encode(errors="replace"), expected.encode(errors="replace")
        )

    @staticmethod
    def csrf_ok(session: Session, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(
            given.encode(errors="replace"), session.csrf.encode()
        )
