"""Webhook signatures against the spec's test vectors (shared/spec/vectors)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from jobs.providers.signatures import (
    SignatureError,
    fal_public_keys,
    public_jwk,
    sign_fal,
    verify_fal,
)

# The repository is checked out with shared/ beside it (as in CI).
VECTORS = Path(__file__).resolve().parents[2] / "shared" / "spec" / "vectors"


def _load(name: str) -> dict[str, Any]:
    path = VECTORS / name
    if not path.is_file():
        pytest.skip(f"signature vectors not found at {path}")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


FAL = "fal_webhook_signature.json"


def _cases(name: str) -> list[Any]:
    path = VECTORS / name
    if not path.is_file():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{path} missing"))]
    return [pytest.param(c, id=c["name"]) for c in json.loads(path.read_text())["cases"]]


@pytest.mark.parametrize("case", _cases(FAL))
def test_fal_vectors(case: dict[str, Any]) -> None:
    keys = fal_public_keys(_load(FAL)["jwks"])
    body = base64.b64decode(case["body_base64"])
    assert body == case["body"].encode()
    if case["expected"] == "valid":
        assert (
            verify_fal(case["headers"], body, keys, case["verify_at_unix"])
            == (case["headers"]["X-Fal-Webhook-Request-Id"])
        )
    else:
        with pytest.raises(SignatureError):
            verify_fal(case["headers"], body, keys, case["verify_at_unix"])


def test_fal_needs_the_signer_among_keys_and_headers_case_insensitive() -> None:
    vectors = _load(FAL)
    case = vectors["cases"][0]
    body = case["body"].encode()
    lowered = {k.lower(): v for k, v in case["headers"].items()}
    keys = fal_public_keys(vectors["jwks"])
    verify_fal(lowered, body, keys, case["verify_at_unix"])
    decoy_only = fal_public_keys({"keys": vectors["jwks"]["keys"][:1]})
    with pytest.raises(SignatureError, match="does not match"):
        verify_fal(lowered, body, decoy_only, case["verify_at_unix"])
    with pytest.raises(SignatureError, match="does not match"):
        verify_fal(lowered, body, [], case["verify_at_unix"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x-fal-webhook-signature": None}, "missing header"),
        ({"x-fal-webhook-signature": "zz" * 64}, "not hex"),
        ({"x-fal-webhook-timestamp": "soon"}, "not an integer"),
    ],
)
def test_fal_malformed_headers(change: dict[str, str | None], message: str) -> None:
    key = Ed25519PrivateKey.generate()
    headers = sign_fal(key, "r1", "u1", 1000, b"{}")
    lowered = {k.lower(): v for k, v in headers.items()}
    for name, value in change.items():
        if value is None:
            lowered.pop(name)
        else:
            lowered[name] = value
    with pytest.raises(SignatureError, match=message):
        verify_fal(lowered, b"{}", fal_public_keys({"keys": [public_jwk(key, "k")]}), 1000)


def test_jwks_skips_foreign_and_broken_keys() -> None:
    key = Ed25519PrivateKey.generate()
    jwks = {
        "keys": [
            {"kty": "RSA", "n": "x", "e": "AQAB"},
            {"kty": "OKP", "crv": "Ed25519", "x": "!!!"},
            {"kty": "OKP", "crv": "X25519", "x": public_jwk(key, "a")["x"]},
            "nonsense",
            public_jwk(key, "good"),
        ]
    }
    assert len(fal_public_keys(jwks)) == 1
    assert fal_public_keys({"keys": "no"}) == []
