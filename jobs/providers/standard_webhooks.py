"""Standard Webhooks v1 (HMAC-SHA256), the scheme Replicate signs its callbacks with. Pure:
no I/O and no clock of its own, so the spec's test vectors check it offline.

A delivery carries three headers: ``webhook-id``, ``webhook-timestamp`` (Unix seconds) and
``webhook-signature``, a space-separated list of ``<version>,<base64 signature>`` entries.
The signature is ``HMAC-SHA256(key, "<id>.<timestamp>.<raw body>")`` where the key is the
base64 text after ``whsec_`` in the secret.

Several secrets may be configured (our own rotation: the old and the new one both verify
while a change is rolled out) and several signatures may arrive (the sender's rotation);
any ``v1`` signature matching any secret passes. Entries of other versions (``v1a``, the
asymmetric variant) are skipped. The timestamp window is not optional: a delivery more than
``tolerance`` seconds away from ``now``, in either direction, is refused, so a captured
delivery cannot be replayed later.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping

from ..config import Secret
from ..errors import ConfigError
from .signatures import SignatureError

TOLERANCE_SECONDS = 300
PREFIX = "whsec_"
# Standard Webhooks asks for secrets of 24 to 64 bytes.
MIN_KEY_BYTES = 24
MAX_KEY_BYTES = 64

ID = "webhook-id"
TIMESTAMP = "webhook-timestamp"
SIGNATURE = "webhook-signature"
HEADERS = (ID, TIMESTAMP, SIGNATURE)

# ASCII digits only: ``int()`` would also take " 12", "+12", "1_2" and non-ASCII digits,
# which a sender never signs and a verifier should not normalise.
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SEPARATORS = re.compile(r"[\s,]+")


def secret_key(secret: str) -> bytes:
    """The HMAC key of ``whsec_<base64>``; ``ValueError`` (never quoting the secret) when it
    is not one."""
    if not secret.startswith(PREFIX):
        raise ValueError(f"does not start with {PREFIX}")
    encoded = secret[len(PREFIX) :]
    try:
        # Padding is optional in practice (the reference libraries add it back).
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (ValueError, binascii.Error):
        raise ValueError(f"is not {PREFIX} followed by base64") from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"holds {len(key)} key bytes, not {MIN_KEY_BYTES} to {MAX_KEY_BYTES}")
    return key


def parse_secrets(raw: str, *, name: str = "JOBS_REPLICATE_WEBHOOK_SECRET") -> tuple[Secret, ...]:
    """Split a setting holding one or more secrets (separated by spaces or commas) and check
    each. Raises ``ConfigError`` naming the setting and the position, never the value."""
    parts = [p for p in _SEPARATORS.split(raw.strip()) if p]
    if not parts:
        raise ConfigError(f"{name} is set but empty; unset it or give a whsec_... secret")
    for position, part in enumerate(parts, 1):
        try:
            secret_key(part)
        except ValueError as exc:
            which = f"secret {position} of {len(parts)}" if len(parts) > 1 else "the secret"
            raise ConfigError(
                f"{name}: {which} {exc}; copy it again from Replicate "
                "(GET /v1/webhooks/default/secret; the value is not shown)"
            ) from None
    return tuple(Secret(p) for p in parts)


def signed_content(msg_id: str, timestamp: str, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode() + body


def verify(
    headers: Mapping[str, str],
    body: bytes,
    secrets: Iterable[Secret | str],
    now: float,
    tolerance: float = TOLERANCE_SECONDS,
) -> str:
    """Check a delivery; return its ``webhook-id`` (the same across the sender's retries of
    one message) or raise :class:`SignatureError` with a one-line reason."""
    h = {k.lower(): v for k, v in headers.items()}
    missing = [name for name in HEADERS if not h.get(name)]
    if missing:
        raise SignatureError(f"missing header(s): {', '.join(missing)}")
    if not body:
        raise SignatureError("empty body")
    raw_time = h[TIMESTAMP]
    if not _TIMESTAMP.fullmatch(raw_time):
        raise SignatureError(f"timestamp {raw_time[:32]!r} is not an integer")
    offset = now - int(raw_time)
    if abs(offset) > tolerance:
        raise SignatureError(
            f"timestamp is {offset:+.0f}s from now, outside the {tolerance:g}s window"
        )
    keys = []
    for position, secret in enumerate(secrets, 1):
        value = secret.reveal() if isinstance(secret, Secret) else secret
        try:
            keys.append(secret_key(value))
        except ValueError as exc:
            raise SignatureError(f"webhook secret {position} {exc}") from None
    if not keys:
        raise SignatureError("no webhook secret to verify with")
    candidates = []
    for entry in h[SIGNATURE].split():
        version, _, encoded = entry.partition(",")
        if version != "v1":
            continue
        try:
            candidates.append(base64.b64decode(encoded, validate=True))
        except (ValueError, binascii.Error):
            continue
    if not candidates:
        raise SignatureError("no v1 signature in the webhook-signature header")
    content = signed_content(h[ID], raw_time, body)
    for key in keys:
        expected = hmac.new(key, content, hashlib.sha256).digest()
        # Every candidate is compared (no early exit on the first mismatch's position).
        if any(hmac.compare_digest(expected, candidate) for candidate in candidates):
            return h[ID]
    raise SignatureError("no v1 signature matches the webhook secret")


def sign(secret: Secret | str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers a Standard Webhooks sender attaches to ``body`` (tests and emulators)."""
    value = secret.reveal() if isinstance(secret, Secret) else secret
    digest = hmac.new(
        secret_key(value), signed_content(msg_id, str(timestamp), body), hashlib.sha256
    ).digest()
    return {
        ID: msg_id,
        TIMESTAMP: str(timestamp),
        SIGNATURE: "v1," + base64.b64encode(digest).decode(),
    }
