"""jobs: a persistent job manager for remote queue APIs (fal.ai, Replicate).

Example::

    from jobs import JobManager

    jm = JobManager()
    job = jm.submit("fal-ai/flux/dev", {"prompt": "a cat"})
    print(jm.result(job.id, wait=True))
"""

__version__ = "0.2.0"

from .config import Settings
from .errors import (
    CancelTooLate,
    ConfigError,
    IdempotencyConflict,
    JobFailed,
    JobNotFinished,
    JobNotFound,
    JobsError,
    ProviderError,
    WaitTimeout,
)
from .events import Completed, InProgress, Queued, Status
from .handles import AsyncJobHandle, SyncJobHandle
from .manager import AsyncJobManager, JobManager
from .records import Job
from .states import FailureReason, State
from .uploads import Uploaded, encode, encode_file, encode_image

__all__ = [
    "AsyncJobHandle",
    "AsyncJobManager",
    "CancelTooLate",
    "Completed",
    "ConfigError",
    "FailureReason",
    "IdempotencyConflict",
    "InProgress",
    "Job",
    "JobFailed",
    "JobManager",
    "JobNotFinished",
    "JobNotFound",
    "JobsError",
    "ProviderError",
    "Queued",
    "Settings",
    "State",
    "Status",
    "SyncJobHandle",
    "Uploaded",
    "WaitTimeout",
    "__version__",
    "encode",
    "encode_file",
    "encode_image",
]
