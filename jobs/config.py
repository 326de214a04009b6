"""Settings, read once from the environment (and overridden by flags) into one typed object.

Nothing else in ``jobs`` reads ``os.environ``. Secrets (``FAL_KEY``, tokens) are kept in
:class:`Secret` wrappers whose ``repr`` and ``str`` never show the value.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .durations import parse_lifetime
from .errors import ConfigError

DEFAULT_DATABASE_URL = "sqlite:///jobs.db"
DEFAULT_FAL_QUEUE_URL = "https://queue.fal.run"
DEFAULT_FAL_REST_URL = "https://rest.fal.ai"
DEFAULT_FAL_RUN_URL = "https://fal.run"
DEFAULT_UPLOAD_TTL = "30d"
DEFAULT_UPLOAD_MAX_BYTES = 10 * 1024**3
DEFAULT_FAL_JWKS_URL = "https://rest.alpha.fal.ai/.well-known/jwks.json"
DEFAULT_REPLICATE_API_URL = "https://api.replicate.com"
DEFAULT_CACHE_MAX_FILE_BYTES = 512 * 1024 * 1024
DEFAULT_CACHE_FILE_TIMEOUT = 600.0
DEFAULT_MAX_SUBMIT_ATTEMPTS = 3
DUPLICATE_POLICIES = ("keep", "cancel")
DEFAULT_CACHE_HOST_SLOTS = 8  # half the shared slots: fal serves most files from one CDN host


class Secret:
    """A credential that never appears in logs, reprs or error messages."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def decimal(text: str) -> int | None:
    """The integer ``text`` spells in ASCII digits, else None. ``str.isdigit`` alone also
    accepts digits such as ``²`` or ``①`` that ``int`` refuses."""
    stripped = text.strip()
    return int(stripped) if stripped.isascii() and stripped.isdigit() else None


def _secret(value: str | None) -> Secret | None:
    return Secret(value) if value else None


def _bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{name} must be a boolean (1/0, true/false), not {raw!r}")


def _check_credential(name: str, secret: Secret | None) -> None:
    """A credential sent in an HTTP header must be printable ASCII. A pasted key with a line
    break or a typographic character would otherwise fail inside the HTTP client, after the
    job was recorded, with an error that may quote the key."""
    if secret is not None and not all(" " < c < "\x7f" for c in secret.reveal()):
        raise ConfigError(
            f"{name} holds a line break, a space, a control or a non-ASCII character; "
            "copy it again (the value is not shown)"
        )


def _host_list(name: str, raw: str) -> tuple[str, ...]:
    """A comma-separated list of host names, addresses and CIDR ranges."""
    from .egress import parse_allow_entry  # egress imports aiohttp: only when one is set

    entries = tuple(e.strip() for e in raw.split(",") if e.strip())
    for entry in entries:
        try:
            parse_allow_entry(entry)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    return entries


def _number(name: str, raw: str, cast: type[float] | type[int]) -> float | int:
    try:
        value = cast(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name} must not be negative, not {raw!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """Everything configurable; README.md lists the variables and their defaults."""

    database_url: str = DEFAULT_DATABASE_URL
    sqlite_synchronous: str = "NORMAL"
    fal_key: Secret | None = None
    fal_queue_url: str = DEFAULT_FAL_QUEUE_URL
    fal_jwks_url: str = DEFAULT_FAL_JWKS_URL
    fal_rest_url: str = DEFAULT_FAL_REST_URL
    fal_run_url: str = DEFAULT_FAL_RUN_URL
    # Lifetime asked for uploaded files ("never" or a duration), and the largest upload.
    upload_ttl: str = DEFAULT_UPLOAD_TTL
    upload_max_bytes: int = DEFAULT_UPLOAD_MAX_BYTES
    public_url: str | None = None
    # More names the job API and dashboard answer to (besides localhost, IP addresses, the
    # bind address and public_url's host): a guard against DNS rebinding.
    allowed_hosts: tuple[str, ...] = ()
    api_token: Secret | None = None
    cache_dir: str = ".jobs-cache"
    cache_files: bool = False
    # Per downloaded result file: a size cap (bytes) and a wall-clock limit (seconds).
    cache_max_file_bytes: int = DEFAULT_CACHE_MAX_FILE_BYTES
    cache_file_timeout: float = DEFAULT_CACHE_FILE_TIMEOUT
    # Downloads at once from one host, so a few slow hosts cannot take every slot.
    cache_host_slots: int = DEFAULT_CACHE_HOST_SLOTS
    # Hosts (names, addresses, CIDR ranges) the file cache may reach although they are not
    # public internet addresses (jobs/egress.py).
    cache_allow_hosts: tuple[str, ...] = ()
    replicate_api_token: Secret | None = None
    replicate_api_url: str = DEFAULT_REPLICATE_API_URL
    # One or more ``whsec_...`` secrets, separated by spaces or commas: during a rotation
    # both the old and the new secret verify (:attr:`replicate_webhook_secrets`).
    replicate_webhook_secret: Secret | None = None
    # Which of a prediction's events Replicate sends webhooks for: ``completed`` (the only
    # one it retries), and ``start``, ``output``, ``logs`` for earlier news.
    replicate_webhook_events: tuple[str, ...] = ("completed",)
    # What to do with a job whose submit may or may not have reached the provider.
    ambiguous_policy: str = "resubmit"
    # Most submits that may have reached the provider, per job (ambiguous resubmits
    # included); then the job fails as ``ambiguous_submit``.
    max_submit_attempts: int = DEFAULT_MAX_SUBMIT_ATTEMPTS
    # A second remote request found for one job: ``keep`` lets it run (recorded),
    # ``cancel`` cancels it at the provider while it still runs.
    duplicate_policy: str = "keep"
    # The fal account's user id: webhooks from other accounts are never applied. Learned
    # from the first callback for a request we submitted when not configured.
    fal_user_id: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            parse_lifetime(self.upload_ttl)
        except ValueError as exc:
            raise ConfigError(f"JOBS_UPLOAD_TTL: {exc}") from None
        if self.ambiguous_policy not in {"resubmit", "fail"}:
            raise ConfigError(
                f"JOBS_AMBIGUOUS_POLICY must be 'resubmit' or 'fail', not {self.ambiguous_policy!r}"
            )
        if self.duplicate_policy not in DUPLICATE_POLICIES:
            raise ConfigError(
                f"JOBS_DUPLICATE_POLICY must be 'keep' or 'cancel', not {self.duplicate_policy!r}"
            )
        if self.max_submit_attempts < 1:
            raise ConfigError(
                f"JOBS_MAX_SUBMIT_ATTEMPTS must be at least 1, not {self.max_submit_attempts}"
            )
        if self.sqlite_synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ConfigError(
                "JOBS_SQLITE_SYNCHRONOUS must be NORMAL or FULL (or OFF/EXTRA), "
                f"not {self.sqlite_synchronous!r}"
            )
        _check_credential("FAL_KEY", self.fal_key)
        _check_credential("JOBS_API_TOKEN", self.api_token)
        _check_credential("REPLICATE_API_TOKEN", self.replicate_api_token)
        _ = self.replicate_webhook_secrets  # a malformed secret is refused at load
        events = {"start", "output", "logs", "completed"}  # webhook_events_filter's values
        if not self.replicate_webhook_events or set(self.replicate_webhook_events) - events:
            raise ConfigError(
                "JOBS_REPLICATE_WEBHOOK_EVENTS takes a comma-separated list of "
                f"{', '.join(sorted(events))}, not {','.join(self.replicate_webhook_events)!r}"
            )
        if self.cache_host_slots < 1:
            raise ConfigError(
                f"JOBS_CACHE_HOST_SLOTS must be at least 1, not {self.cache_host_slots}"
            )
        if os.path.exists(self.cache_dir) and not os.path.isdir(self.cache_dir):
            raise ConfigError(
                f"JOBS_CACHE_DIR {self.cache_dir!r} is a file, not a directory; "
                "point it at a directory (it is created if missing)"
            )

    @property
    def secrets(self) -> list[Secret]:
        """Every credential in the settings (any field holding a :class:`Secret`, and each
        webhook secret of a rotation on its own), for redaction from logs and answers."""
        values = (getattr(self, name) for name in self.__dataclass_fields__)
        found = [value for value in values if isinstance(value, Secret)]
        return [*found, *self.replicate_webhook_secrets]

    @property
    def replicate_webhook_secrets(self) -> tuple[Secret, ...]:
        """The secrets in ``JOBS_REPLICATE_WEBHOOK_SECRET``, each checked (``ConfigError``
        for one that is not ``whsec_`` and base64 of 24 to 64 bytes)."""
        if self.replicate_webhook_secret is None:
            return ()
        # imported only when set: it pulls in the signature code
        from .providers.standard_webhooks import parse_secrets

        return parse_secrets(self.replicate_webhook_secret.reveal())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``JOBS_*``, ``FAL_KEY`` and ``REPLICATE_API_TOKEN``; ``overrides`` win."""
        env = os.environ if environ is None else environ
        fal_key = env.get("FAL_KEY")
        if not fal_key and env.get("FAL_KEY_ID") and env.get("FAL_KEY_SECRET"):
            fal_key = f"{env['FAL_KEY_ID']}:{env['FAL_KEY_SECRET']}"
        values: dict[str, Any] = {
            "database_url": env.get("JOBS_DATABASE_URL") or DEFAULT_DATABASE_URL,
            "sqlite_synchronous": env.get("JOBS_SQLITE_SYNCHRONOUS") or "NORMAL",
            "fal_key": _secret(fal_key),
            "fal_queue_url": (env.get("JOBS_FAL_QUEUE_URL") or DEFAULT_FAL_QUEUE_URL).rstrip("/"),
            "fal_jwks_url": env.get("JOBS_FAL_JWKS_URL") or DEFAULT_FAL_JWKS_URL,
            "fal_rest_url": (env.get("JOBS_FAL_REST_URL") or DEFAULT_FAL_REST_URL).rstrip("/"),
            "fal_run_url": (env.get("JOBS_FAL_RUN_URL") or DEFAULT_FAL_RUN_URL).rstrip("/"),
            "upload_ttl": env.get("JOBS_UPLOAD_TTL") or DEFAULT_UPLOAD_TTL,
            "upload_max_bytes": _number(
                "JOBS_UPLOAD_MAX_BYTES",
                env.get("JOBS_UPLOAD_MAX_BYTES") or str(DEFAULT_UPLOAD_MAX_BYTES),
                int,
            ),
            "public_url": (env.get("JOBS_PUBLIC_URL") or "").rstrip("/") or None,
            "allowed_hosts": _host_list("JOBS_ALLOWED_HOSTS", env.get("JOBS_ALLOWED_HOSTS", "")),
            "api_token": _secret(env.get("JOBS_API_TOKEN")),
            "cache_dir": env.get("JOBS_CACHE_DIR") or ".jobs-cache",
            "cache_files": _bool("JOBS_CACHE_FILES", env.get("JOBS_CACHE_FILES", "")),
            "cache_max_file_bytes": _number(
                "JOBS_CACHE_MAX_FILE_BYTES",
                env.get("JOBS_CACHE_MAX_FILE_BYTES") or str(DEFAULT_CACHE_MAX_FILE_BYTES),
                int,
            ),
            "cache_file_timeout": _number(
                "JOBS_CACHE_FILE_TIMEOUT",
                env.get("JOBS_CACHE_FILE_TIMEOUT") or str(DEFAULT_CACHE_FILE_TIMEOUT),
                float,
            ),
            "replicate_api_token": _secret(env.get("REPLICATE_API_TOKEN")),
            "replicate_webhook_events": tuple(
                e.strip()
                for e in env.get("JOBS_REPLICATE_WEBHOOK_EVENTS", "completed").split(",")
                if e.strip()
            ),
            "cache_host_slots": _number(
                "JOBS_CACHE_HOST_SLOTS",
                env.get("JOBS_CACHE_HOST_SLOTS") or str(DEFAULT_CACHE_HOST_SLOTS),
                int,
            ),
            "cache_allow_hosts": _host_list(
                "JOBS_CACHE_ALLOW_HOSTS", env.get("JOBS_CACHE_ALLOW_HOSTS", "")
            ),
            "replicate_api_url": (
                env.get("JOBS_REPLICATE_API_URL") or DEFAULT_REPLICATE_API_URL
            ).rstrip("/"),
            "replicate_webhook_secret": _secret(env.get("JOBS_REPLICATE_WEBHOOK_SECRET")),
            "ambiguous_policy": env.get("JOBS_AMBIGUOUS_POLICY") or "resubmit",
            "max_submit_attempts": _number(
                "JOBS_MAX_SUBMIT_ATTEMPTS",
                env.get("JOBS_MAX_SUBMIT_ATTEMPTS") or str(DEFAULT_MAX_SUBMIT_ATTEMPTS),
                int,
            ),
            "duplicate_policy": env.get("JOBS_DUPLICATE_POLICY") or "keep",
            "fal_user_id": env.get("JOBS_FAL_USER_ID") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)
