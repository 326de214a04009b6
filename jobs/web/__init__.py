"""The HTTP face of ``jobs``: the job API, the fal webhook receiver, health, metrics, a
dashboard and an OpenAPI document, as one Starlette app built by :func:`create_app`.

One small module per concept: ``api`` (``/v1/jobs``), ``webhooks``, ``ops`` (``/healthz``,
``/metrics``), ``dashboard``, ``openapi``, ``middleware`` (cross-cutting ASGI classes),
``errors`` (the one exception-to-status mapping) and ``app`` (assembly and lifespan).
"""

from .app import create_app

__all__ = ["create_app"]
