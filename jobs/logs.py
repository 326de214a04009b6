"""Log set-up for ``jobs serve``: plain text or one JSON object per line, the job's ids on
every line about a job, and no secret ever written.

Why each piece exists:

- JSON lines (``--log-format json``) are what log stores ingest without a parser; text is for
  a terminal. Both carry the same fields.
- A line about a job is only useful if it can be found by the id the user holds (ours or the
  provider's request id). :func:`job_context` puts both ids in a context variable, and every
  record logged inside it (by any module, in that asyncio task) carries them.
- ``FAL_KEY``, ``JOBS_API_TOKEN`` and the other credentials must never reach a log, not even
  inside an exception message or a dumped header map. :class:`RedactFilter` sits on the
  handler, so it sees every record (ours and third-party ones) before it is formatted.

This module is named ``logs`` (not ``logging``) so that it never shadows the standard
library for a reader or a tool.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal, TextIO

from .config import Settings

LogFormat = Literal["text", "json"]
REDACTED = "***"
MIN_SUBSTRING_SECRET = 8  # shorter secrets are hidden as whole words only
# Libraries that log every request, every scheduler run or their own set-up at INFO/DEBUG:
# kept at WARNING whatever the level, which applies to ``jobs`` (and uvicorn) only.
QUIET_LOGGERS = ("apscheduler", "httpx", "httpcore", "aiohttp", "alembic", "tzlocal")
# uvicorn adds an ANSI-coloured copy of some messages; no use in a log file.
_DROPPED_EXTRAS = frozenset({"color_message"})

_JOB: ContextVar[tuple[str, str | None] | None] = ContextVar("jobs_log_job", default=None)

# `Authorization: Key abc`, `'authorization': 'Bearer abc'`, `authorization=Basic abc`: keep
# the header name and the scheme, hide the credential.
_AUTH_VALUE = re.compile(
    r"""(?ix)
    (authorization ["']? \s* [:=] \s* ["']? \s*)
    ((?:key|bearer|basic|token) \s+)?
    [^\s"',;)}\]]+
    """
)
# The attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)


@contextmanager
def job_context(job_id: str, request_id: str | None = None) -> Iterator[None]:
    """Every record logged inside this block carries ``job_id`` and ``request_id``."""
    token = _JOB.set((job_id, request_id))
    try:
        yield
    finally:
        _JOB.reset(token)


class JobContextFilter(logging.Filter):
    """Copy the ids of :func:`job_context` onto the record (``extra=`` given ids win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _JOB.get()
        if current is not None:
            if getattr(record, "job_id", None) is None:
                record.job_id = current[0]
            if getattr(record, "request_id", None) is None:
                record.request_id = current[1]
        return True


class RedactFilter(logging.Filter):
    """Replace known secret values and ``Authorization`` header values with ``***`` in the
    message, its arguments, string extras, the exception text and the stack."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is hidden whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        # A short secret (a test key such as "k") would also match inside ordinary words
        # and garble every line: it is hidden only where it stands as a word of its own.
        self._short = [
            re.compile(rf"(?<![A-Za-z0-9]){re.escape(s)}(?![A-Za-z0-9])")
            for s in self._secrets
            if len(s) < MIN_SUBSTRING_SECRET
        ]
        self._formatter = logging.Formatter()

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if len(secret) >= MIN_SUBSTRING_SECRET:
                text = text.replace(secret, REDACTED)
        for pattern in self._short:
            text = pattern.sub(REDACTED, text)
        return _AUTH_VALUE.sub(lambda m: f"{m.group(1)}{m.group(2) or ''}{REDACTED}", text)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for name, value in list(vars(record).items()):
            if name not in _STANDARD and isinstance(value, str):
                setattr(record, name, self.redact(value))
        return True


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        name: value
        for name, value in vars(record).items()
        if name not in _STANDARD and name not in _DROPPED_EXTRAS and value is not None
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message``, then the
    record's extras (``job_id``, ``request_id``, …) and ``exc`` for an exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_extras(record))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value …`` with the same fields as the JSON lines."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        text = f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if fields:
            text += f" [{fields}]"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + record.stack_info
        return text


def secrets_of(settings: Settings) -> list[str]:
    """Every credential in the settings, revealed (:attr:`Settings.secrets`)."""
    return [secret.reveal() for secret in settings.secrets]


def configure(
    settings: Settings,
    *,
    log_format: LogFormat = "text",
    level: str = "INFO",
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) in ``log_format``, redacted. ``level``
    applies to the ``jobs`` loggers; others log from INFO (uvicorn's start and stop lines),
    and the chatty libraries of :data:`QUIET_LOGGERS` from WARNING."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(JobContextFilter())
    handler.addFilter(RedactFilter(secrets_of(settings)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root.setLevel(max(numeric, logging.INFO))
    logging.getLogger("jobs").setLevel(numeric)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler


__all__ = [
    "JobContextFilter",
    "JsonFormatter",
    "RedactFilter",
    "TextFormatter",
    "configure",
    "job_context",
    "secrets_of",
]
