"""Test doubles for fal's signing keys: a settable clock and a JWKS endpoint whose keys (and
health) a test changes, served through ``httpx.MockTransport``."""

from __future__ import annotations

from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from jobs.manager import AsyncJobManager
from jobs.providers.fal import FalProvider
from jobs.providers.jwks import JwksCache
from jobs.providers.signatures import public_jwk


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class JwksServer:
    """What the JWKS URL answers; counts requests. ``down`` answers 503, or refuses the
    connection with ``refuse=True``; ``body`` replaces the document when set."""

    def __init__(self, *keys: Ed25519PrivateKey, refuse: bool = False) -> None:
        self.keys = list(keys)
        self.down = False
        self.refuse = refuse
        self.body: Any = None
        self.requests = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if self.down:
            if self.refuse:
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(503, text="down")
        if self.body is not None:
            return httpx.Response(200, json=self.body)
        jwks = {"keys": [public_jwk(k, f"k{i}") for i, k in enumerate(self.keys)]}
        return httpx.Response(200, json=jwks)


def use_keys(manager: AsyncJobManager, keys: JwksCache) -> AsyncJobManager:
    """``manager``, its fal provider verifying webhooks against ``keys`` (a test's JWKS)."""
    provider = manager.provider("fal")
    assert isinstance(provider, FalProvider)
    provider.keys = keys
    return manager
