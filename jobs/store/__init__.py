"""The store layer: every SQL statement ``jobs`` runs lives in this package.

- :mod:`jobs.store.transactions`: the engine, transactions and their bounded retries;
- :mod:`jobs.store.transitions`: the write commands and the compare-and-set apply that moves
  a job between the states of :mod:`jobs.states`;
- :mod:`jobs.store.files`: result files, retention and uploads;
- :mod:`jobs.store.queries`: :class:`Store`, the one object the rest of ``jobs`` calls.

The records it reads and writes (:class:`~jobs.records.Job`, …) live in :mod:`jobs.records`;
they are re-exported here for callers that also use the store.
"""

from ..records import (
    MAX_LABEL_KEY,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MIN_PREFIX,
    SHORT_ID_LENGTH,
    SHORT_ID_START,
    Applied,
    BatchProgress,
    Claimed,
    Delivered,
    DuplicateRequest,
    GcBatch,
    Job,
    JobFile,
    NewFile,
    NewJob,
    NewUpload,
    Overview,
    PollJob,
    UploadRecord,
    check_column_text,
    column_length,
    is_id_prefix,
    iso,
    new_job_id,
    short_id,
)
from .queries import Store
from .transactions import DB_RETRIES
from .transitions import (
    BeginSubmit,
    Callback,
    Change,
    MarkSubmitted,
    Polled,
    Write,
)

__all__ = [
    "DB_RETRIES",
    "MAX_LABELS",
    "MAX_LABEL_KEY",
    "MAX_LABEL_VALUE",
    "MIN_PREFIX",
    "SHORT_ID_LENGTH",
    "SHORT_ID_START",
    "Applied",
    "BatchProgress",
    "BeginSubmit",
    "Callback",
    "Change",
    "Claimed",
    "Delivered",
    "DuplicateRequest",
    "GcBatch",
    "Job",
    "JobFile",
    "MarkSubmitted",
    "NewFile",
    "NewJob",
    "NewUpload",
    "Overview",
    "PollJob",
    "Polled",
    "Store",
    "UploadRecord",
    "Write",
    "check_column_text",
    "column_length",
    "is_id_prefix",
    "iso",
    "new_job_id",
    "short_id",
]
