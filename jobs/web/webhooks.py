"""``POST /v1/webhooks/fal``: verify a fal callback, apply it, answer.

The endpoint only verifies, applies and answers (docs/internals.md §3): the raw body goes
unchanged to :meth:`AsyncJobManager.handle_fal_webhook`, which checks the signature and
applies the outcome through the same compare-and-set path as a poll. Body limits, request
ids and redaction are middleware.

Answers (fal retries non-2xx deliveries for about two hours, so only what a retry could fix
is answered with a retryable code):

=====  =====================================================================
200    applied; also a duplicate, a delivery for a request we do not know, a
       finished request whose payload fal could not include (polled soon), and
       one not applied: ``foreign`` (another fal account sent it) or
       ``duplicate_request`` (a second remote request for a job: recorded)
400    authentic but unreadable: not JSON, no ``request_id``, unknown status
401    not authentic: a signature header missing, a stale or future timestamp
       (more than 300 s off), a signature that matches no key
413    body over the limit (:class:`jobs.web.middleware.BodySizeLimit`)
503    no signing key known and fal's JWKS unreachable: fail closed, retry later;
       also a callback that would adopt a job while our fal account is not known
       yet (``account_unknown``: learned from the first callback for a request we
       submitted, or set as ``JOBS_FAL_USER_ID``)
=====  =====================================================================

A signature that matches no cached key triggers one (rate-limited) JWKS refetch and a
second verification, so a key rotation costs at most one rejected delivery per key.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..manager import AsyncJobManager
from ..metrics import WEBHOOKS
from ..providers.jwks import JwksCache, JwksUnavailable
from ..providers.signatures import SignatureError
from ..store import Delivered
from .errors import error_response

log = logging.getLogger(__name__)

FAL_PATH = "/v1/webhooks/fal"
RETRY_AFTER_SECONDS = 60


def _outcome(delivered: Delivered) -> str:
    applied = delivered.applied
    if applied is None:
        return delivered.refused or "unknown"
    if not applied.job.terminal:
        # Finished remotely but sent without its payload: the job was made due for a poll.
        return "needs_poll"
    return "applied" if applied.changed else "duplicate"


class FalWebhooks:
    def __init__(self, manager: AsyncJobManager, jwks: JwksCache) -> None:
        self.manager = manager
        self.jwks = jwks

    def routes(self) -> list[Route]:
        return [Route(FAL_PATH, self.receive, methods=["POST"])]

    async def _handle(
        self, headers: Mapping[str, str], body: bytes, job_id: str | None, attempt: int | None
    ) -> Delivered:
        keys: list[Ed25519PublicKey] = await self.jwks.keys()
        handle = self.manager.handle_fal_webhook
        try:
            return await handle(headers, body, keys, job_id=job_id, attempt=attempt)
        except SignatureError:
            if not await self.jwks.refresh_after_miss(keys):
                raise
        keys = await self.jwks.keys()
        return await handle(headers, body, keys, job_id=job_id, attempt=attempt)

    async def receive(self, request: Request) -> Response:
        body = await request.body()
        job_id = request.query_params.get("job") or None
        attempt_text = request.query_params.get("attempt", "")
        # Only ASCII digits (str.isdigit also accepts other scripts' digits); anything
        # else is ignored: the attempt only explains a duplicate.
        attempt = int(attempt_text) if attempt_text.isascii() and attempt_text.isdigit() else None
        try:
            delivered = await self._handle(request.headers, body, job_id, attempt)
        except JwksUnavailable as exc:
            WEBHOOKS.labels("fal", "unavailable").inc()
            log.warning("fal webhook refused, no signing keys: %s", exc)
            return error_response(
                503,
                "keys_unavailable",
                "cannot verify webhooks now: fal's signing keys could not be fetched",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        except SignatureError as exc:
            WEBHOOKS.labels("fal", "rejected").inc()
            log.info("fal webhook rejected: %s", exc)
            return error_response(401, "invalid_signature", str(exc))
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            WEBHOOKS.labels("fal", "malformed").inc()
            log.info("fal webhook malformed: %s", exc)
            return error_response(400, "malformed", str(exc))
        outcome = _outcome(delivered)
        WEBHOOKS.labels("fal", outcome).inc()
        if outcome == "foreign":
            log.warning("fal webhook not applied: it comes from another fal account")
        if outcome == "unverified":
            # Retryable: the account is learned from the first callback for a request we
            # submitted, usually moments later; fal delivers again.
            log.warning("fal webhook deferred: the fal account is not known yet")
            return error_response(
                503,
                "account_unknown",
                "cannot tell yet whether this callback comes from our fal account "
                "(set JOBS_FAL_USER_ID to know it from the start)",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        reply: dict[str, object] = {"ok": True, "outcome": outcome}
        applied = delivered.applied
        if applied is not None:
            reply["id"] = applied.job.id
            reply["state"] = applied.job.state.value
        return JSONResponse(reply)
