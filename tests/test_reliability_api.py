"""API abuse, in-process (ASGI), bounded.

Schemathesis reads ``/openapi.json`` from the app and generates requests for every
operation, inputs that fit the document and inputs that do not: with the API token, no
answer is a 5xx and every answer is one the document lists, in the shape it documents;
without the token (or with a wrong one), every protected route answers 401 and nothing is
recorded. Hypothesis then sends raw requests schemathesis would not (any method, any path,
odd headers and bodies). Last, submits Python's JSON parser reads but no queue could be sent
(nesting deeper than the parser goes, ``NaN``, lone surrogates, a hint that cannot be a
header, a newline in the URL path) are refused with a 4xx rather than a 500, and leave no
job behind in ``submitting``.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import func, select
from starlette.applications import Starlette
from support.jwks import use_keys

from jobs.config import Secret, Settings
from jobs.db import jobs as jobs_table
from jobs.manager import AsyncJobManager
from jobs.migrate import upgrade
from jobs.providers.base import Observation
from jobs.providers.jwks import JwksCache
from jobs.providers.signatures import public_jwk
from jobs.states import FailureReason, State
from jobs.store import NewJob
from jobs.testing import FakeFalConfig, FakeFalServer
from jobs.web import create_app
from jobs.web.app import protected
from jobs.web.openapi import PATHS

pytestmark = pytest.mark.timeout(120)

APP = "fal-ai/flux/dev"
FAL_KEY = "fal-key-api-abuse-0001"
TOKEN = "api-token-api-abuse-0002"
AUTH = f"Bearer {TOKEN}"
# Per operation and generation mode; 13 operations x 2 modes stay around 20 s in all.
EXAMPLES = 40
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
OPERATIONS = [(path, method.upper()) for path, item in PATHS.items() for method in item]
# Negative generation needs something to break: a parameter or a body.
WITH_INPUTS = {
    (path, method.upper())
    for path, item in PATHS.items()
    for method, op in item.items()
    if op.get("parameters") or op.get("requestBody")
}
PROTECTED = [
    (path, method) for path, method in OPERATIONS if PATHS[path][method.lower()].get("security")
]


def _settings(db_url: str, fal_url: str) -> Settings:
    return Settings.from_env(
        {},
        database_url=db_url,
        fal_queue_url=fal_url,
        fal_key=Secret(FAL_KEY),
        api_token=Secret(TOKEN),
        # Replicate's callbacks can be verified: an unsigned one is refused, not a 503.
        replicate_webhook_secret=Secret("whsec_" + base64.b64encode(b"k" * 32).decode()),
        allowed_hosts=("testserver",),  # the host name schemathesis sends
    )


def _keys_client() -> httpx.AsyncClient:
    jwk = public_jwk(Ed25519PrivateKey.generate(), "k")
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"keys": [jwk]}))
    return httpx.AsyncClient(transport=transport)


@dataclass
class Api:
    """The app schemathesis talks to, its manager, and ids of jobs in every state."""

    app: Starlette
    manager: AsyncJobManager
    schema: Any
    refs: list[str]

    def count_jobs(self) -> int:
        with self.manager.store.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(jobs_table)).scalar_one())


def _seed(manager: AsyncJobManager) -> list[str]:
    """Jobs in each state, so generated requests for ``/v1/jobs/{id}…`` sometimes hit one."""
    store = manager.store
    refs = []
    for state in (State.SUBMITTING, State.SUCCEEDED, State.FAILED, State.CANCELLED):
        job, _ = store.create_job(NewJob(application=APP, arguments={"seed": state.value}))
        if state is not State.SUBMITTING:
            obs = Observation(
                state=state,
                result={"images": []} if state is State.SUCCEEDED else None,
                error=None if state is State.SUCCEEDED else {"message": "it broke"},
                failure_reason=FailureReason.REMOTE_ERROR if state is State.FAILED else None,
            )
            store.apply(job.id, obs)
        refs.append(job.id)
    return refs


@pytest.fixture(scope="module")
def fal() -> Iterator[FakeFalServer]:
    with FakeFalServer(FakeFalConfig(duration=0.2, queue_time=0.05, seed=9, key=FAL_KEY)) as server:
        yield server


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, fal: FakeFalServer) -> Iterator[Api]:
    """One app for every schemathesis test of the module. Schemathesis serves it on an event
    loop of its own (a thread), starts its lifespan on the first request of a test and shuts
    it down when the test ends (its pytest plugin does): ``stop`` then closes the provider's
    HTTP client on the loop that opened it (the next request opens a new one)."""
    db_url = f"sqlite:///{tmp_path_factory.mktemp('api')}/jobs.db"
    upgrade(db_url)
    manager = AsyncJobManager(_settings(db_url, fal.url), migrate=False)
    keys_client = _keys_client()

    async def start() -> None:
        # aclose() (at each stop) drops the providers; the next one gets the test's keys too
        use_keys(manager, JwksCache("https://keys.example/jwks.json", keys_client))

    async def stop() -> None:
        await manager.aclose()

    app = create_app(manager, settings=manager.settings, lifespan_hooks=[(start, stop)])
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        refs = _seed(manager)
        # One job the emulator really has, queued for ten minutes: cancels reach the queue.
        queued = schema["/v1/jobs"]["POST"].Case(
            body={"application": APP, "arguments": {"_fake": {"queue_time": 600}}},
            media_type="application/json",
        )
        accepted = queued.call(headers={"Authorization": AUTH})
        assert accepted.status_code == 202, accepted.text
        refs += [accepted.json()["id"], accepted.json()["request_id"]]
        yield Api(app, manager, schema, refs)
    finally:
        schemathesis_asgi.shutdown_lifespans()
        manager.store.close()
        asyncio.run(keys_client.aclose())  # a MockTransport: bound to no loop


def _strategy(api: Api, path: str, method: str, mode: GenerationMode) -> Any:
    operation = api.schema[path][method]
    strategy = operation.as_strategy(generation_mode=mode)
    if "{id}" in path:  # random ids are all unknown: also aim at jobs that exist
        strategy |= st.sampled_from(api.refs).flatmap(
            lambda ref: operation.as_strategy(generation_mode=mode, path_parameters={"id": ref})
        )
    return strategy


SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def _modes() -> list[Any]:
    params = []
    for path, method in OPERATIONS:
        for mode in GenerationMode:
            if mode is GenerationMode.NEGATIVE and (path, method) not in WITH_INPUTS:
                continue
            params.append(pytest.param(path, method, mode, id=f"{method} {path} {mode.value}"))
    return params


@pytest.mark.parametrize(("path", "method", "mode"), _modes())
def test_no_input_gets_a_5xx_or_an_undocumented_answer(
    api: Api, path: str, method: str, mode: GenerationMode
) -> None:
    seen: dict[int, int] = {}

    @SETTINGS
    @given(case=_strategy(api, path, method, mode))
    def check(case: Any) -> None:
        case.headers["Authorization"] = AUTH  # generated cases may carry their own
        response = case.call()
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        case.validate_response(response, checks=CHECKS)

    check()
    assert seen and max(seen) < 500, seen


@pytest.mark.parametrize(
    ("path", "method"), [pytest.param(p, m, id=f"{m} {p}") for p, m in PROTECTED]
)
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer not-the-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}"],
    ids=["none", "wrong", "basic", "longer", "shorter"],
)
def test_without_the_token_every_protected_route_is_401(
    api: Api, path: str, method: str, authorization: str | None
) -> None:
    before = api.count_jobs()

    @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=_strategy(api, path, method, GenerationMode.POSITIVE))
    def check(case: Any) -> None:
        case.headers.pop("Authorization", None)
        if authorization is not None:
            case.headers["Authorization"] = authorization
        response = case.call()
        assert response.status_code == 401, (response.status_code, response.text)
        assert response.json()["error"]["type"] == "unauthorized"
        assert TOKEN not in response.text

    check()
    assert api.count_jobs() == before  # nothing was submitted


def test_the_protected_operations_are_the_ones_guarded() -> None:
    """The document's ``security`` and the middleware's ``protected`` agree, so the 401 test
    above covers every guarded route, and guarded routes are all documented as such."""
    documented = {path for path, _ in PROTECTED}
    assert documented == {path for path in PATHS if protected(path)}
    assert {"/v1/jobs", "/v1/jobs/{id}", "/v1/jobs/{id}/result", "/v1/batches"} <= documented


# --- raw requests --------------------------------------------------------------------------


@pytest.fixture
async def raw_client(
    sqlite_migrated_url: str, fal: FakeFalServer
) -> AsyncIterator[tuple[httpx.AsyncClient, AsyncJobManager]]:
    manager = AsyncJobManager(_settings(sqlite_migrated_url, fal.url))
    async with _keys_client() as keys_client:
        app = create_app(
            use_keys(manager, JwksCache("https://keys.example/jwks.json", keys_client)),
            settings=manager.settings,
        )
        # A crash is answered 500, as a server would, so assertions show what the client saw.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            try:
                yield client, manager
            finally:
                await manager.aclose()
                manager.store.close()


_segment = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="/?#"), max_size=12
).map(lambda s: quote(s, safe=""))
paths = st.one_of(
    st.sampled_from(
        ["/", "/v1/jobs", "/v1/webhooks/fal", "/healthz", "/metrics", "/openapi.json", "/v1"]
    ),
    _segment.map(lambda s: f"/v1/jobs/{s}"),
    st.tuples(_segment, st.sampled_from(["result", "cancel", "", "x"])).map(
        lambda t: f"/v1/jobs/{t[0]}/{t[1]}"
    ),
    # (A relative URL may not start with "//": httpx refuses to send it.)
    st.lists(_segment, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts).lstrip("/")),
)
methods = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
_visible = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
raw_headers = st.dictionaries(
    st.sampled_from(
        ["content-type", "accept", "x-request-id", "content-encoding", "range", "if-none-match"]
    ),
    _visible,
    max_size=3,
)
queries = st.dictionaries(
    st.sampled_from(["state", "limit", "cursor", "application", "batch", "job", "x"]),
    _visible,
    max_size=3,
)
raw_bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=200),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=8,
    ).map(lambda v: httpx.Request("POST", "/", json=v).content),
    st.fixed_dictionaries(
        {"application": st.sampled_from([APP, "a/b", "nope"]) | _visible},
        optional={"arguments": st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)},
    ).map(lambda v: httpx.Request("POST", "/", json=v).content),
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=methods,
    path=paths,
    params=queries,
    headers=raw_headers,
    body=raw_bodies,
    token=st.sampled_from([AUTH, None, "Bearer nope"]),
)
async def test_raw_requests_never_get_a_5xx(
    raw_client: tuple[httpx.AsyncClient, AsyncJobManager],
    method: str,
    path: str,
    params: dict[str, str],
    headers: dict[str, str],
    body: bytes,
    token: str | None,
) -> None:
    client, _ = raw_client
    if token is not None:
        headers = {**headers, "authorization": token}
    response = await client.request(method, path, params=params, headers=headers, content=body)
    assert response.status_code < 500, (method, path, response.status_code, response.text)
    if token != AUTH and protected(httpx.URL(path).path):
        assert response.status_code == 401, (method, path, response.status_code)


# --- submits no queue could be sent --------------------------------------------------------

NESTED = 100_000
DEEP = b"[" * NESTED + b"]" * NESTED


def _submit(fields: bytes) -> bytes:
    """A submit body for APP, written by hand: ``fields`` may be JSON Python reads but
    ``json.dumps`` would not write (NaN, lone surrogates, deep nesting)."""
    return b'{"application": "' + APP.encode() + b'", ' + fields + b"}"


UNSENDABLE = {
    "deeply nested body": _submit(b'"arguments": ' + DEEP),
    "deeply nested arguments": _submit(b'"arguments": {"x": ' + DEEP + b"}"),
    "NaN": _submit(b'"arguments": {"x": NaN}'),
    "Infinity": _submit(b'"arguments": {"x": -Infinity}'),
    "lone surrogate in arguments": _submit(b'"arguments": {"prompt": "\\ud800"}'),
    "lone surrogate in the application": (
        b'{"application": "fal-ai/\\udfff/dev", "arguments": {}}'
    ),
    # The hint becomes the X-Fal-Runner-Hint header, the path part of the URL.
    "newline in the hint": _submit(b'"arguments": {}, "hint": "lora:a\\r\\nX-Evil: 1"'),
    "non-ASCII hint": _submit(b'"arguments": {}, "hint": "caf\\u00e9"'),
    "newline in the path": _submit(b'"arguments": {}, "path": "a\\nb"'),
}


@pytest.mark.parametrize("body", list(UNSENDABLE.values()), ids=list(UNSENDABLE))
async def test_submits_no_queue_could_be_sent_are_refused_not_500(
    raw_client: tuple[httpx.AsyncClient, AsyncJobManager], fal: FakeFalServer, body: bytes
) -> None:
    client, manager = raw_client
    attempts = fal.stats.submit_attempts
    response = await client.post(
        "/v1/jobs",
        content=body,
        headers={"authorization": AUTH, "content-type": "application/json"},
    )
    assert response.status_code in (400, 422), (response.status_code, response.text)
    assert response.json()["error"]["type"] in ("invalid_json", "invalid_request")
    # Nothing was recorded: no job is left in submitting for the resolver to resend forever.
    assert await manager.list_jobs() == []
    assert fal.stats.submit_attempts == attempts
