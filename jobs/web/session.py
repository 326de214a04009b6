"""Browser sessions and CSRF protection for the dashboard pages.

A browser cannot send ``Authorization: Bearer``, so with ``JOBS_API_TOKEN`` set, ``/login``
takes the token once and answers with a session cookie. The cookie is not the token: it is
an issue time and an HMAC of it under a key derived from the token, so any replica can check
it without shared state, it expires, and changing the token ends every session. It is
``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no other site's page sends it) and
``Secure`` when the dashboard is served over https.

Every dashboard form (cancel, retry, login, logout) carries a CSRF value that must equal the
``jobs_csrf`` cookie (a random value set with the page): another site can make a browser
post a form here but can neither read that cookie nor set it. Requests a browser marks as
cross-site (``Sec-Fetch-Site``) are refused outright.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from urllib.parse import quote

from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ..config import Secret, decimal
from .errors import error_response

SESSION_COOKIE = "jobs_session"
CSRF_COOKIE = "jobs_csrf"
CSRF_FIELD = "csrf"
SESSION_SECONDS = 12 * 3600
LOGIN_PATH = "/login"


def _key(token: Secret) -> bytes:
    # A key of its own, so a session cookie is never a value that authenticates the API.
    return hashlib.sha256(b"jobs-dashboard-session\0" + token.reveal().encode()).digest()


def _signature(token: Secret, issued: str) -> str:
    return hmac.new(_key(token), issued.encode(), hashlib.sha256).hexdigest()


def new_session(token: Secret, *, now: float | None = None) -> str:
    """A session cookie value: ``<issued>.<hmac>``."""
    issued = str(int(time.time() if now is None else now))
    return f"{issued}.{_signature(token, issued)}"


def valid_session(token: Secret, value: str | None, *, now: float | None = None) -> bool:
    """True when ``value`` was made by :func:`new_session` with this token and has not expired."""
    if not value:
        return False
    issued, _, signature = value.partition(".")
    seconds = decimal(issued)
    if seconds is None:
        return False
    now = time.time() if now is None else now
    if not 0 <= now - seconds <= SESSION_SECONDS:
        return False
    return hmac.compare_digest(signature, _signature(token, issued))


def bearer_ok(token: Secret, header: str | None) -> bool:
    scheme, _, credentials = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        credentials.strip().encode(), token.reveal().encode()
    )


def is_https(request: Request, public_url: str | None) -> bool:
    return request.url.scheme == "https" or (public_url or "").startswith("https://")


def csrf_value(request: Request) -> str:
    """The CSRF value of this browser (its cookie), or a new one to set with the page."""
    current = request.cookies.get(CSRF_COOKIE, "")
    return current if len(current) == 43 else secrets.token_urlsafe(32)


def set_csrf_cookie(response: Response, value: str, *, secure: bool) -> None:
    response.set_cookie(
        CSRF_COOKIE, value, httponly=True, samesite="strict", secure=secure, path="/"
    )


def csrf_ok(request: Request, submitted: str | None) -> bool:
    """The form's CSRF value matches the cookie, and the browser did not call it cross-site."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    cookie = request.cookies.get(CSRF_COOKIE)
    return bool(cookie and submitted) and hmac.compare_digest(
        str(cookie).encode(), str(submitted).encode()
    )


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this site only (never ``//host`` or a URL)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


class SessionAuth:
    """Guard the dashboard pages selected by ``pages``: a valid session cookie (or the
    bearer header, for scripts) passes; anything else is sent to ``/login``."""

    def __init__(self, app: ASGIApp, *, token: Secret, pages: Callable[[str], bool]) -> None:
        self.app = app
        self._token = token
        self.pages = pages

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.pages(scope["path"]):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if valid_session(self._token, request.cookies.get(SESSION_COOKIE)) or bearer_ok(
            self._token, request.headers.get("authorization")
        ):
            await self.app(scope, receive, send)
            return
        here = URL(scope=scope)
        target = here.path + (f"?{here.query}" if here.query else "")
        location = f"{LOGIN_PATH}?next={quote(target, safe='')}"
        response: Response
        if request.headers.get("hx-request"):
            # A live refresh after the session ended: a redirect would be followed inside
            # htmx's request and swap the login form into the page; this loads /login.
            response = error_response(401, "unauthorized", "log in at /login first")
            response.headers["HX-Redirect"] = location
        elif request.method not in ("GET", "HEAD"):
            response = error_response(401, "unauthorized", "log in at /login first")
        else:
            response = RedirectResponse(location, status_code=303)
        await response(scope, receive, send)
