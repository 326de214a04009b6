"""``GET /openapi.json``: an OpenAPI 3.1 description of every route, written by hand.

Hand-written because the handlers are plain Starlette functions with hand-written input
checks; a test keeps it true (every route of the app is documented, every documented route
exists, the request examples validate against their schemas and are accepted by the app,
and the ``Job`` schema lists exactly the fields ``Job.to_dict`` returns).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..providers import NAMES as PROVIDERS
from ..providers.fal import PRIORITIES
from ..states import FailureReason, State

OPENAPI_VERSION = "3.1.0"


def _nullable(kind: str, **extra: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], **extra}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


STATES = [s.value for s in State]
TIMESTAMP = _nullable("string", format="date-time")

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {
                    "type": {"type": "string", "description": "machine-readable kind"},
                    "message": {"type": "string", "description": "what went wrong, for people"},
                    "field": {"type": "string", "description": "the request field at fault"},
                    "detail": {"description": "the provider's own error detail"},
                    "status_code": _nullable("integer"),
                    "job": {"type": "object", "description": "the job a failed submit created"},
                },
            }
        },
    },
    "SubmitRequest": {
        "type": "object",
        "required": ["application", "arguments"],
        "additionalProperties": False,
        "properties": {
            "application": {
                "type": "string",
                "description": "fal endpoint id, or a Replicate model (owner/name), version "
                "(owner/name:id) or deployment (deployments/owner/name)",
            },
            "arguments": {"type": "object", "description": "the model's input"},
            "provider": {"enum": list(PROVIDERS), "default": "fal"},
            "path": _nullable("string", description="sub-path of the endpoint"),
            "priority": {"enum": [*PRIORITIES, None]},
            "hint": _nullable("string", description="X-Fal-Runner-Hint"),
            "labels": {
                "type": ["object", "null"],
                "additionalProperties": {"type": "string"},
            },
            "batch": _nullable("string"),
            "idempotency_key": _nullable(
                "string", description="a second submit with the same key returns the first job"
            ),
        },
    },
    "SubmitAccepted": {
        "type": "object",
        "required": ["id", "request_id", "state", "status_url", "result_url"],
        "properties": {
            "id": {"type": "string"},
            "request_id": _nullable("string", description="null while the submit is ambiguous"),
            "state": {"enum": STATES},
            "status_url": {"type": "string", "format": "uri"},
            "result_url": {"type": "string", "format": "uri"},
        },
    },
    "Job": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "short_id": {
                "type": "string",
                "description": "the part of the id that tells jobs apart; it names the job too",
            },
            "provider": {"type": "string"},
            "application": {"type": "string"},
            "path": _nullable("string"),
            "request_id": _nullable("string"),
            "state": {"enum": STATES},
            "failure_reason": {"enum": [*(r.value for r in FailureReason), None]},
            "error": _nullable("object"),
            "queue_position": _nullable("integer"),
            "priority": _nullable("string"),
            "hint": _nullable("string"),
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "batch": _nullable("string"),
            "batch_index": _nullable("integer"),
            "idempotency_key": _nullable("string"),
            "webhook": {"type": "boolean"},
            "status_url": _nullable("string", description="the provider's status URL"),
            "response_url": _nullable("string", description="the provider's result URL"),
            "cancel_url": _nullable("string", description="the provider's cancel URL"),
            "metrics": _nullable("object"),
            "polls": {"type": "integer"},
            "attempts": {"type": "integer", "description": "times the job was sent"},
            "retry_of": _nullable("string", description="the job this one retries"),
            "tracked": {"type": "boolean", "description": "adopted by track: never sent by jobs"},
            "created_at": TIMESTAMP,
            "submitted_at": TIMESTAMP,
            "started_at": TIMESTAMP,
            "finished_at": TIMESTAMP,
            "updated_at": TIMESTAMP,
        },
    },
    "JobPage": {
        "type": "object",
        "required": ["jobs", "next_cursor"],
        "properties": {
            "jobs": {"type": "array", "items": _ref("Job")},
            "next_cursor": _nullable("string", description="pass as ?cursor= for the next page"),
        },
    },
    "FailedResult": {
        "type": "object",
        "required": ["id", "state", "error"],
        "properties": {
            "id": {"type": "string"},
            "state": {"enum": ["failed", "cancelled"]},
            "error": _nullable("object"),
        },
    },
    "FalWebhook": {
        "type": "object",
        "required": ["request_id", "status"],
        "properties": {
            "request_id": {"type": "string"},
            "gateway_request_id": {"type": "string"},
            "status": {"enum": ["OK", "ERROR"]},
            "payload": {"description": "the result, or the app's error body"},
            "error": _nullable("string"),
            "payload_error": {"type": "string"},
        },
    },
    "ReplicatePrediction": {
        "type": "object",
        "required": ["id", "status"],
        "properties": {
            "id": {"type": "string"},
            "status": {
                "enum": ["starting", "processing", "succeeded", "failed", "canceled", "aborted"]
            },
            "output": {"description": "the result once succeeded"},
            "error": {"description": "why it failed"},
            "logs": _nullable("string"),
            "metrics": {"type": ["object", "null"]},
        },
    },
    "WebhookAck": {
        "type": "object",
        "required": ["ok", "outcome"],
        "properties": {
            "ok": {"const": True},
            "outcome": {
                "enum": [
                    "applied",
                    "duplicate",
                    "unknown",
                    "needs_poll",
                    "foreign",
                    "duplicate_request",
                ]
            },
            "id": {"type": "string"},
            "state": {"enum": STATES},
        },
    },
    "Events": {
        "type": "object",
        "required": ["id", "events"],
        "properties": {
            "id": {"type": "string"},
            "events": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["at", "kind"],
                    "properties": {
                        "at": TIMESTAMP,
                        "kind": {"type": "string", "description": "created, submit_sent, …"},
                        "from_state": {"enum": [*STATES, None]},
                        "to_state": {"enum": [*STATES, None]},
                        "reason": _nullable("string"),
                        "detail": {"description": "what the event carried"},
                    },
                },
            },
        },
    },
    "Logs": {
        "type": "object",
        "required": ["id", "logs"],
        "properties": {
            "id": {"type": "string"},
            "logs": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Batch": {
        "type": "object",
        "required": ["name", "total", "done", "counts"],
        "properties": {
            "name": {"type": "string"},
            "total": {"type": "integer"},
            "done": {"type": "integer", "description": "jobs in a terminal state"},
            "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
            "started_at": TIMESTAMP,
            "last_finished_at": TIMESTAMP,
            "rate_per_second": _nullable("number", description="jobs finished per second"),
            "eta_seconds": _nullable("number", description="at the rate so far"),
        },
    },
    "BatchList": {
        "type": "object",
        "required": ["batches"],
        "properties": {"batches": {"type": "array", "items": _ref("Batch")}},
    },
    "Health": {
        "type": "object",
        "required": ["status", "database"],
        "properties": {
            "status": {"enum": ["ok", "unavailable"]},
            "database": {"enum": ["up", "down", "writes_failing"]},
            "error": {"type": "string", "description": "why the last write failed"},
        },
    },
}

JOB_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "our job id or the provider's request id",
    "schema": {"type": "string"},
}
BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
UNAUTHORIZED = _error("API token missing or wrong (only when JOBS_API_TOKEN is set)")
NOT_FOUND = _error("no job with that id or request id")

SUBMIT_EXAMPLES = {
    "minimal": {"value": {"application": "fal-ai/flux/dev", "arguments": {"prompt": "a cat"}}},
    "everything": {
        "value": {
            "application": "fal-ai/flux/dev",
            "arguments": {"prompt": "a lighthouse at dusk", "seed": 7},
            "priority": "low",
            "hint": "gpu-a",
            "labels": {"team": "research"},
            "batch": "lighthouses",
            "idempotency_key": "lighthouse-7",
        }
    },
}

PATHS: dict[str, Any] = {
    "/v1/jobs": {
        "post": {
            "summary": "Record and submit a job",
            "security": BEARER,
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": _ref("SubmitRequest"),
                        "examples": SUBMIT_EXAMPLES,
                    }
                },
            },
            "responses": {
                "202": _json(_ref("SubmitAccepted"), "recorded and sent (or being resolved)"),
                "400": _error("the body is not a JSON object"),
                "401": UNAUTHORIZED,
                "413": _error("body over the size limit"),
                "409": _error("the idempotency_key names a job with other arguments"),
                "415": _error("the body is not declared 'Content-Type: application/json'"),
                "422": _error("a field is invalid, or the provider rejected the job"),
                "502": _error("the provider could not be reached; nothing was queued"),
                "503": _error("the database failed; repeat with the same idempotency_key"),
            },
        },
        "get": {
            "summary": "List jobs, newest first",
            "security": BEARER,
            "parameters": [
                {"name": "state", "in": "query", "schema": {"enum": STATES}},
                {"name": "application", "in": "query", "schema": {"type": "string"}},
                {"name": "batch", "in": "query", "schema": {"type": "string"}},
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
                },
                {"name": "cursor", "in": "query", "schema": {"type": "string"}},
            ],
            "responses": {
                "200": _json(_ref("JobPage"), "a page of jobs"),
                "401": UNAUTHORIZED,
                "422": _error("a query parameter is invalid"),
            },
        },
    },
    "/v1/jobs/{id}": {
        "get": {
            "summary": "A job's status",
            "security": BEARER,
            "parameters": [JOB_ID],
            "responses": {
                "200": _json(_ref("Job"), "the job"),
                "401": UNAUTHORIZED,
                "404": NOT_FOUND,
            },
        }
    },
    "/v1/jobs/{id}/result": {
        "get": {
            "summary": "A finished job's result",
            "security": BEARER,
            "parameters": [JOB_ID],
            "responses": {
                "200": {
                    "description": "the result as the model returned it; for a failed or "
                    "cancelled job, its state and error",
                    "content": {
                        "application/json": {
                            "schema": {"anyOf": [{"description": "any JSON"}, _ref("FailedResult")]}
                        }
                    },
                },
                "401": UNAUTHORIZED,
                "404": NOT_FOUND,
                "409": _error("not finished yet"),
                "410": _error("succeeded, but the cached result was removed"),
            },
        }
    },
    "/v1/jobs/{id}/cancel": {
        "post": {
            "summary": "Ask the provider to cancel a job",
            "security": BEARER,
            "parameters": [JOB_ID],
            "responses": {
                "202": _json(_ref("Job"), "asked; the state turns cancelled once confirmed"),
                "401": UNAUTHORIZED,
                "404": NOT_FOUND,
                "409": _error("already finished"),
                "502": _error("the provider could not be reached"),
            },
        }
    },
    "/v1/jobs/{id}/files/{n}": {
        "get": {
            "summary": "A file of a job's result, from the local cache (jobs/web/files.py)",
            "security": BEARER,
            "parameters": [
                JOB_ID,
                {
                    "name": "n",
                    "in": "path",
                    "required": True,
                    "description": "the file's place in the result (0, 1, …), as listed by "
                    "`jobs result --files` and `jobs export`",
                    "schema": {"type": "integer", "minimum": 0},
                },
            ],
            "responses": {
                "200": {
                    "description": "the file's bytes, with its content type",
                    "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                },
                "401": UNAUTHORIZED,
                "404": _error("unknown job or file, or the download failed (the error says)"),
                "409": _error("the file is not downloaded yet"),
            },
        }
    },
    "/v1/webhooks/fal": {
        "post": {
            "summary": "fal completion callback (ED25519-signed)",
            "parameters": [
                {
                    "name": "job",
                    "in": "query",
                    "description": "our job id, in the URL we gave fal",
                    "schema": {"type": "string"},
                },
                {
                    "name": "attempt",
                    "in": "query",
                    "description": "which submit attempt of the job this URL was given to",
                    "schema": {"type": "integer", "minimum": 1},
                },
                *(
                    {"name": name, "in": "header", "required": True, "schema": {"type": "string"}}
                    for name in (
                        "X-Fal-Webhook-Request-Id",
                        "X-Fal-Webhook-User-Id",
                        "X-Fal-Webhook-Timestamp",
                        "X-Fal-Webhook-Signature",
                    )
                ),
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("FalWebhook")}},
            },
            "responses": {
                "200": _json(
                    _ref("WebhookAck"),
                    "accepted (also duplicates, unknown requests, callbacks from another fal "
                    "account and second remote requests for one job, none of them applied)",
                ),
                "400": _error("authentic but malformed"),
                "401": _error("missing signature headers, stale timestamp or bad signature"),
                "413": _error("body over the size limit"),
                "503": _error(
                    "signing keys unavailable, or our fal account not known yet for a callback "
                    "that would settle an ambiguous submit; fal retries later"
                ),
            },
        }
    },
    "/v1/webhooks/replicate": {
        "post": {
            "summary": "Replicate prediction callback (Standard Webhooks, HMAC-SHA256)",
            "parameters": [
                {
                    "name": "job",
                    "in": "query",
                    "description": "our job id, in the URL we gave Replicate",
                    "schema": {"type": "string"},
                },
                {
                    "name": "attempt",
                    "in": "query",
                    "description": "which submit attempt of the job this URL was given to",
                    "schema": {"type": "integer", "minimum": 1},
                },
                *(
                    {"name": name, "in": "header", "required": True, "schema": {"type": "string"}}
                    for name in ("webhook-id", "webhook-timestamp", "webhook-signature")
                ),
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("ReplicatePrediction")}},
            },
            "responses": {
                "200": _json(
                    _ref("WebhookAck"),
                    "accepted (also repeats of a message, unknown predictions and second "
                    "predictions for one job, none of them applied)",
                ),
                "400": _error("authentic but malformed"),
                "401": _error("missing signature headers, stale timestamp or bad signature"),
                "413": _error("body over the size limit"),
                "503": _error(
                    "JOBS_REPLICATE_WEBHOOK_SECRET is not set, so nothing can be verified; "
                    "Replicate retries the final webhook for about a minute"
                ),
            },
        }
    },
    "/healthz": {
        "get": {
            "summary": "Database health",
            "responses": {
                "200": _json(_ref("Health"), "the database answers"),
                "503": _json(_ref("Health"), "the database does not answer or cannot be written"),
            },
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics",
            "responses": {
                "200": {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
        }
    },
}


def _page(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/html": {"schema": {"type": "string"}}}}


def _html(summary: str, **extra: Any) -> dict[str, Any]:
    """A dashboard page (text/html). With a token set, the pages need the session cookie
    that /login sets (or the bearer header) and send anyone else to /login with a 303."""
    return {
        "summary": summary,
        **extra,
        "responses": {
            "200": _page("an HTML page"),
            "303": {"description": "to /login (token set, no session), or after a form"},
            "401": _page("the token given to /login is wrong"),
            "403": _page("a form without this browser's CSRF value, or from another site"),
            "421": _error("the Host header names a host this server is not"),
            # HTML from the page; JSON from the router for a path no route matches.
            "404": {
                "description": "no such job or batch",
                "content": {
                    "text/html": {"schema": {"type": "string"}},
                    "application/json": {"schema": _ref("Error")},
                },
            },
            "422": _page("a filter is invalid"),
        },
    }


NAME = {"type": "string", "minLength": 1, "maxLength": 1000}
BATCH_NAME = {"name": "name", "in": "path", "required": True, "schema": NAME}
JOB_REF = {**JOB_ID, "description": "our job id, request id or key", "schema": NAME}

READ_PATHS: dict[str, Any] = {
    "/v1/jobs/{id}/events": {
        "get": {
            "summary": "Every recorded event of a job, oldest first",
            "security": BEARER,
            "parameters": [JOB_ID],
            "responses": {
                "200": _json(_ref("Events"), "the events"),
                "401": UNAUTHORIZED,
                "404": NOT_FOUND,
            },
        }
    },
    "/v1/jobs/{id}/logs": {
        "get": {
            "summary": "A job's stored log lines",
            "security": BEARER,
            "parameters": [JOB_ID],
            "responses": {
                "200": _json(_ref("Logs"), "the log lines, in order"),
                "401": UNAUTHORIZED,
                "404": NOT_FOUND,
            },
        }
    },
    "/v1/jobs/{id}/retry": {
        "post": {
            "summary": "A new attempt for a failed or cancelled job (the same one if asked again)",
            "security": BEARER,
            "parameters": [JOB_ID],
            "responses": {
                "202": _json(_ref("Job"), "the new job, linked by retry_of and sent"),
                "401": UNAUTHORIZED,
                "404": NOT_FOUND,
                "409": _error("the job is not failed or cancelled, or was tracked"),
                "422": _error("the provider rejected the new attempt"),
                "502": _error("the provider could not be reached"),
            },
        }
    },
    "/v1/batches": {
        "get": {
            "summary": "Batches with their progress, newest first",
            "security": BEARER,
            "parameters": [
                {"name": "active", "in": "query", "schema": {"type": "boolean"}},
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                },
            ],
            "responses": {
                "200": _json(_ref("BatchList"), "the batches"),
                "401": UNAUTHORIZED,
                "422": _error("a query parameter is invalid"),
            },
        }
    },
    "/v1/batches/{name}": {
        "get": {
            "summary": "One batch's counts and progress",
            "security": BEARER,
            "parameters": [BATCH_NAME],
            "responses": {
                "200": _json(_ref("Batch"), "the batch"),
                "401": UNAUTHORIZED,
                "404": _error("no job has this batch name"),
            },
        }
    },
}

CSRF_FORM = {
    "required": True,
    "content": {
        "application/x-www-form-urlencoded": {
            "schema": {
                "type": "object",
                "required": ["csrf"],
                "properties": {"csrf": {"type": "string", "description": "the page's CSRF value"}},
            }
        }
    },
}

PAGE_PATHS: dict[str, Any] = {
    "/": {"get": _html("The overview: counts, batches, failures, backlog, request economy")},
    "/jobs": {
        "get": _html(
            "Search and filter jobs",
            parameters=[
                {"name": name, "in": "query", "schema": {"type": "string"}}
                for name in ("q", "state", "application", "batch", "label", "before", "limit")
            ],
        )
    },
    "/jobs/{id}": {"get": _html("One job's page", parameters=[JOB_REF])},
    "/jobs/{id}/cancel": {
        "post": _html("Cancel from the job's page", parameters=[JOB_REF], requestBody=CSRF_FORM)
    },
    "/jobs/{id}/retry": {
        "post": _html("Retry from the job's page", parameters=[JOB_REF], requestBody=CSRF_FORM)
    },
    "/jobs/{id}/files/{n}": {
        "get": {
            **{k: v for k, v in PATHS["/v1/jobs/{id}/files/{n}"]["get"].items() if k != "security"},
            "summary": "A cached file, for the job page's previews (a session, not the header)",
        }
    },
    "/batches/{name}": {"get": _html("One batch's page", parameters=[BATCH_NAME])},
    "/export.jsonl": {
        "get": {
            "summary": "A batch's jobs and results as JSON lines, in input order",
            "parameters": [{"name": "batch", "in": "query", "schema": {"type": "string"}}],
            "responses": {
                "200": {
                    "description": "one JSON object per line",
                    "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
                },
                "404": _error("no such batch"),
            },
        }
    },
    "/login": {
        "get": _html("The login form (only with JOBS_API_TOKEN set)"),
        "post": _html("Log in with the token; sets the session cookie", requestBody=CSRF_FORM),
    },
    "/logout": {"post": _html("End the session", requestBody=CSRF_FORM)},
    "/docs": {"get": _html("This API, rendered for people")},
}

# One table of every route: the API's, the read routes and the dashboard's.
PATHS.update(READ_PATHS)
PATHS.update(PAGE_PATHS)

# Every route behind the API token is also behind the host check (jobs/web/middleware.py),
# and every one taking a job id refuses one no job can have.
for _item in PATHS.values():
    for _method, _op in _item.items():
        if _op.get("security"):
            _op["responses"]["421"] = _error("the Host header names a host this server is not")
            if _method == "post":
                _op["responses"]["403"] = _error("sent by a page of another web site")
        if JOB_ID in _op.get("parameters", []) or JOB_REF in _op.get("parameters", []):
            _op["responses"].setdefault("400", _error("not a job id or request id"))

TAGS = [
    {"name": "jobs", "description": "Submit, follow, fetch and cancel jobs."},
    {"name": "batches", "description": "Groups of jobs submitted together, and their progress."},
    {"name": "webhooks", "description": "Callbacks from the providers (signed)."},
    {"name": "operations", "description": "Health, metrics and this document."},
    {"name": "dashboard", "description": "HTML pages for people (a session cookie)."},
]

# operationId and tag of every operation, in one table so each route is named once.
OPERATIONS: dict[tuple[str, str], tuple[str, str]] = {
    ("/v1/jobs", "post"): ("submitJob", "jobs"),
    ("/v1/jobs", "get"): ("listJobs", "jobs"),
    ("/v1/jobs/{id}", "get"): ("getJob", "jobs"),
    ("/v1/jobs/{id}/result", "get"): ("getJobResult", "jobs"),
    ("/v1/jobs/{id}/cancel", "post"): ("cancelJob", "jobs"),
    ("/v1/jobs/{id}/files/{n}", "get"): ("getJobFile", "jobs"),
    ("/v1/jobs/{id}/events", "get"): ("getJobEvents", "jobs"),
    ("/v1/jobs/{id}/logs", "get"): ("getJobLogs", "jobs"),
    ("/v1/jobs/{id}/retry", "post"): ("retryJob", "jobs"),
    ("/v1/batches", "get"): ("listBatches", "batches"),
    ("/v1/batches/{name}", "get"): ("getBatch", "batches"),
    ("/v1/webhooks/fal", "post"): ("receiveFalWebhook", "webhooks"),
    ("/v1/webhooks/replicate", "post"): ("receiveReplicateWebhook", "webhooks"),
    ("/healthz", "get"): ("getHealth", "operations"),
    ("/metrics", "get"): ("getMetrics", "operations"),
    ("/openapi.json", "get"): ("getOpenApi", "operations"),
    ("/", "get"): ("dashboardOverview", "dashboard"),
    ("/jobs", "get"): ("dashboardJobs", "dashboard"),
    ("/jobs/{id}", "get"): ("dashboardJob", "dashboard"),
    ("/jobs/{id}/cancel", "post"): ("dashboardCancelJob", "dashboard"),
    ("/jobs/{id}/retry", "post"): ("dashboardRetryJob", "dashboard"),
    ("/jobs/{id}/files/{n}", "get"): ("dashboardJobFile", "dashboard"),
    ("/batches/{name}", "get"): ("dashboardBatch", "dashboard"),
    ("/export.jsonl", "get"): ("dashboardExportBatch", "dashboard"),
    ("/login", "get"): ("dashboardLoginForm", "dashboard"),
    ("/login", "post"): ("dashboardLogin", "dashboard"),
    ("/logout", "post"): ("dashboardLogout", "dashboard"),
    ("/docs", "get"): ("apiReference", "operations"),
}


def _named(paths: dict[str, Any]) -> dict[str, Any]:
    """``paths`` with each operation's ``operationId`` and tag from :data:`OPERATIONS`."""
    named: dict[str, Any] = {}
    for path, item in paths.items():
        named[path] = {}
        for method, operation in item.items():
            operation_id, tag = OPERATIONS[(path, method)]
            named[path][method] = {"operationId": operation_id, "tags": [tag], **operation}
    return named


def document(public_url: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "jobs",
            "version": "1",
            "description": "A persistent job manager for remote queue APIs (fal.ai).",
        },
        "tags": TAGS,
        "paths": _named(PATHS),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
    if public_url:
        doc["servers"] = [{"url": public_url}]
    return doc


class OpenApi:
    def __init__(self, public_url: str | None) -> None:
        self.document = document(public_url)

    def routes(self) -> list[Route]:
        return [Route("/openapi.json", self.serve, methods=["GET"])]

    async def serve(self, request: Request) -> Response:
        return JSONResponse(self.document)
