"""fal_client keeps its credentials error here: ``jobs.compat.fal.auth``."""

from __future__ import annotations

from ...errors import ConfigError

MISSING_CREDENTIALS_MESSAGE = (
    "Please set the FAL_KEY environment variable to your API key, "
    "or set the FAL_KEY_ID and FAL_KEY_SECRET environment variables."
)


class MissingCredentialsError(ConfigError):
    """No fal key: raised before anything is recorded or sent."""

    def __init__(self, message: str = MISSING_CREDENTIALS_MESSAGE) -> None:
        super().__init__(message)
