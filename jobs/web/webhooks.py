"""``POST /v1/webhooks/{provider}``: verify a provider's callback, apply it, answer.

The endpoint only verifies, applies and answers (docs/internals.md §3): the raw body goes
unchanged to :meth:`AsyncJobManager.handle_webhook`, whose provider checks the signature;
the outcome is applied through the same compare-and-set path as a poll. Body limits,
request ids and redaction are middleware. One route per provider in
:data:`jobs.providers.NAMES`; the answers are the same for all of them.

Answers (providers retry non-2xx deliveries, so only what a retry could fix is answered
with a retryable code):

=====  =====================================================================
200    applied; also a duplicate, a delivery for a request we do not know, a
       finished request whose payload could not be included (polled soon), and
       one not applied: ``foreign`` (another provider account sent it) or
       ``duplicate_request`` (a second remote request for a job: recorded)
400    authentic but unreadable: not JSON, no request id, unknown status
401    not authentic: a signature header missing, a stale or future timestamp
       (more than 300 s off), a signature that matches no key
413    body over the limit (:class:`jobs.web.middleware.BodySizeLimit`)
503    the signature cannot be checked now (fal: no signing key known and its
       JWKS unreachable): fail closed, retry later; also a callback that would
       adopt a job while our account is not known yet (``account_unknown``:
       learned from the first callback for a request we submitted, or set as
       ``JOBS_FAL_USER_ID``)
=====  =====================================================================
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..manager import AsyncJobManager
from ..metrics import WEBHOOKS
from ..providers import NAMES
from ..providers.base import WebhookUnavailable
from ..providers.signatures import SignatureError
from ..records import Delivered
from .errors import error_response

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 60


def webhook_path(provider: str) -> str:
    """Where ``provider``'s callbacks are received (the job's callback URL names it)."""
    return f"/v1/webhooks/{provider}"


WEBHOOK_PATHS = {webhook_path(name): name for name in NAMES}


def _outcome(delivered: Delivered) -> str:
    applied = delivered.applied
    if applied is None:
        return delivered.refused or "unknown"
    if not applied.job.terminal:
        # Finished remotely but sent without its payload: the job was made due for a poll.
        return "needs_poll"
    return "applied" if applied.changed else "duplicate"


class Webhooks:
    def __init__(self, manager: AsyncJobManager) -> None:
        self.manager = manager

    def routes(self) -> list[Route]:
        return [Route(path, self.receive, methods=["POST"]) for path in WEBHOOK_PATHS]

    async def receive(self, request: Request) -> Response:
        # The scope's path, not request.url: building the whole URL per callback costs ~5 %
        # of the ingest rate (docs/benchmarks.md).
        provider = WEBHOOK_PATHS[request.scope["path"]]
        body = await request.body()
        job_id = request.query_params.get("job") or None
        attempt_text = request.query_params.get("attempt", "")
        # Only ASCII digits (str.isdigit also accepts other scripts' digits); anything
        # else is ignored: the attempt only explains a duplicate.
        attempt = int(attempt_text) if attempt_text.isascii() and attempt_text.isdigit() else None
        handle = self.manager.handle_webhook
        try:
            delivered = await handle(
                provider, request.headers, body, job_id=job_id, attempt=attempt
            )
        except WebhookUnavailable as exc:
            WEBHOOKS.labels(provider, "unavailable").inc()
            log.warning("%s webhook refused, cannot verify it now: %s", provider, exc)
            return error_response(
                503,
                "keys_unavailable",
                f"cannot verify {provider} webhooks now: {exc}",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        except SignatureError as exc:
            WEBHOOKS.labels(provider, "rejected").inc()
            log.info("%s webhook rejected: %s", provider, exc)
            return error_response(401, "invalid_signature", str(exc))
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            WEBHOOKS.labels(provider, "malformed").inc()
            log.info("%s webhook malformed: %s", provider, exc)
            return error_response(400, "malformed", str(exc))
        outcome = _outcome(delivered)
        WEBHOOKS.labels(provider, outcome).inc()
        if outcome == "foreign":
            log.warning("%s webhook not applied: it comes from another account", provider)
        if outcome == "unverified":
            # Retryable: the account is learned from the first callback for a request we
            # submitted, usually moments later; the provider delivers again.
            log.warning("%s webhook deferred: the account is not known yet", provider)
            return error_response(
                503,
                "account_unknown",
                f"cannot tell yet whether this callback comes from our {provider} account "
                "(set JOBS_FAL_USER_ID to know it from the start)",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        reply: dict[str, object] = {"ok": True, "outcome": outcome}
        applied = delivered.applied
        if applied is not None:
            reply["id"] = applied.job.id
            reply["state"] = applied.job.state.value
        return JSONResponse(reply)
