"""fal's webhook signatures, as pure functions: no I/O, no clock of their own.

fal signs with ED25519 over ``request_id \\n user_id \\n timestamp \\n sha256hex(raw body)``
and publishes its public keys as a JWKS (Replicate's Standard Webhooks scheme is
:mod:`jobs.providers.standard_webhooks`). Fetching and caching fal's JWKS is a separate step
(:mod:`jobs.providers.jwks`) so these functions are tested against the spec vectors offline.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

TOLERANCE_SECONDS = 300

FAL_REQUEST_ID = "x-fal-webhook-request-id"
FAL_USER_ID = "x-fal-webhook-user-id"
FAL_TIMESTAMP = "x-fal-webhook-timestamp"
FAL_SIGNATURE = "x-fal-webhook-signature"
FAL_HEADERS = (FAL_REQUEST_ID, FAL_USER_ID, FAL_TIMESTAMP, FAL_SIGNATURE)


class SignatureError(Exception):
    """The delivery is not authentic: missing headers, stale time or a bad signature."""


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def _check_time(raw: str, now: float, tolerance: float) -> None:
    try:
        timestamp = int(raw)
    except ValueError:
        raise SignatureError(f"timestamp {raw[:32]!r} is not an integer") from None
    if abs(now - timestamp) > tolerance:
        raise SignatureError(
            f"timestamp is {now - timestamp:+.0f}s from now, outside the {tolerance:g}s window"
        )


def _b64url_decode(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def fal_public_keys(jwks: Mapping[str, Any]) -> list[Ed25519PublicKey]:
    """The ED25519 keys of a JWKS document; other key types and broken entries are skipped."""
    keys: list[Ed25519PublicKey] = []
    entries = jwks.get("keys") if isinstance(jwks, Mapping) else None
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, Mapping):
            continue
        if entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
            continue
        x = entry.get("x")
        try:
            raw = _b64url_decode(x) if isinstance(x, str) else b""
            keys.append(Ed25519PublicKey.from_public_bytes(raw))
        except (ValueError, binascii.Error):
            continue
    return keys


def fal_signed_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return f"{request_id}\n{user_id}\n{timestamp}\n{digest}".encode()


def verify_fal(
    headers: Mapping[str, str],
    body: bytes,
    keys: Sequence[Ed25519PublicKey],
    now: float,
    *,
    tolerance: float = TOLERANCE_SECONDS,
) -> str:
    """Check a fal webhook delivery; return the signed request id or raise SignatureError."""
    h = _lower(headers)
    missing = [name for name in FAL_HEADERS if not h.get(name)]
    if missing:
        raise SignatureError(f"missing header(s): {', '.join(missing)}")
    _check_time(h[FAL_TIMESTAMP], now, tolerance)
    try:
        signature = bytes.fromhex(h[FAL_SIGNATURE])
    except ValueError:
        raise SignatureError("signature is not hex") from None
    message = fal_signed_message(h[FAL_REQUEST_ID], h[FAL_USER_ID], h[FAL_TIMESTAMP], body)
    if not verify_any(keys, signature, message):
        raise SignatureError("signature does not match any known fal key")
    return h[FAL_REQUEST_ID]


def verify_any(keys: Iterable[Ed25519PublicKey], signature: bytes, message: bytes) -> bool:
    for key in keys:
        try:
            key.verify(signature, message)
            return True
        except InvalidSignature:
            continue
    return False


def sign_fal(
    private_key: Ed25519PrivateKey, request_id: str, user_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The headers fal would send with ``body``: used by the emulator and by tests."""
    message = fal_signed_message(request_id, user_id, str(timestamp), body)
    return {
        "X-Fal-Webhook-Request-Id": request_id,
        "X-Fal-Webhook-User-Id": user_id,
        "X-Fal-Webhook-Timestamp": str(timestamp),
        "X-Fal-Webhook-Signature": private_key.sign(message).hex(),
    }


def public_jwk(private_key: Ed25519PrivateKey, kid: str) -> dict[str, str]:
    """The JWKS entry for ``private_key``'s public half."""
    raw = private_key.public_key().public_bytes_raw()
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "use": "sig", "alg": "EdDSA"}
