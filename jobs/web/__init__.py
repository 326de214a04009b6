"""The HTTP face of ``jobs``: the job API, the fal webhook receiver, health, metrics, a
dashboard and an OpenAPI document, as one Starlette app built by :func:`create_app`.

One small module per concept: ``api`` (``/v1/jobs``), ``reads`` (events, logs, batches),
``retries``, ``files``, ``webhooks``, ``ops`` (``/healthz``, ``/metrics``), ``pages`` (the
dashboard, its templates and static files), ``session`` (login and CSRF), ``params`` (query
parameters), ``openapi``, ``middleware`` (cross-cutting ASGI classes), ``errors`` (the one
exception-to-status mapping) and ``app`` (assembly and lifespan).
"""

from .app import create_app

__all__ = ["create_app"]
