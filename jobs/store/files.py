"""Result files, retention (``jobs gc``) and uploads: the store's queries about bytes kept
outside the database (the file cache, fal's CDN) rather than about job states.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

from sqlalchemy import (
    Row,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from ..db import (
    job_events,
    job_files,
    jobs,
    results,
    upload_parts,
    uploads,
)
from ..records import GcBatch, JobFile, NewFile, NewUpload, UploadRecord, iso, new_job_id
from ..states import State
from .transactions import Transactions, _chunks


def _referenced(conn: Connection, digests: Sequence[str]) -> list[str]:
    query = select(job_files.c.sha256).where(job_files.c.sha256.in_(digests)).distinct()
    return [d for d in conn.execute(query).scalars() if d is not None]


def _files_of(conn: Connection, job_ids: Sequence[str]) -> dict[str, list[JobFile]]:
    rows = conn.execute(
        select(job_files)
        .where(job_files.c.job_id.in_(job_ids))
        .order_by(job_files.c.job_id, job_files.c.n)
    ).all()
    found: dict[str, list[JobFile]] = {}
    for row in rows:
        found.setdefault(row.job_id, []).append(JobFile(**row._mapping))
    return found


class FileQueries(Transactions):
    """Queries about result files, their retention, and uploads."""

    # --- result files, batches and retention ----------------------------------------------

    def add_files(
        self, job_id: str, files: Sequence[NewFile], *, now: float | None = None
    ) -> list[JobFile]:
        """Record the files of a job's result as ``pending`` (those not recorded yet, so a
        second call changes nothing); return every file row of the job."""
        now = time.time() if now is None else now

        def tx(conn: Connection) -> list[JobFile]:
            have = set(
                conn.execute(select(job_files.c.n).where(job_files.c.job_id == job_id)).scalars()
            )
            fresh = [
                {
                    "job_id": job_id,
                    "n": f.n,
                    "url": f.url,
                    "json_path": f.json_path,
                    "file_name": f.file_name,
                    "content_type": f.content_type,
                    "state": "pending",
                    "stored_at": now,
                }
                for f in files
                if f.n not in have
            ]
            if fresh:
                conn.execute(insert(job_files), fresh)
            return _files_of(conn, [job_id]).get(job_id, [])

        try:
            return self._tx(tx)
        except IntegrityError:  # another process recorded them between our read and write
            return self._tx(tx)

    def set_file(
        self,
        job_id: str,
        n: int,
        *,
        state: str,
        sha256: str | None = None,
        size: int | None = None,
        content_type: str | None = None,
        error: str | None = None,
        now: float | None = None,
    ) -> None:
        """Record a download's outcome; ``content_type`` only fills a type the result lacked."""
        now = time.time() if now is None else now
        self._tx(
            lambda conn: conn.execute(
                update(job_files)
                .where(job_files.c.job_id == job_id, job_files.c.n == n)
                .values(
                    state=state,
                    sha256=sha256,
                    size=size,
                    error=error,
                    stored_at=now,
                    content_type=func.coalesce(job_files.c.content_type, content_type),
                )
            )
        )

    def files(self, job_id: str) -> list[JobFile]:
        return self.files_of([job_id]).get(job_id, [])

    def files_of(self, job_ids: Sequence[str]) -> dict[str, list[JobFile]]:
        """File rows of many jobs, by job id, each list in ``n`` order."""
        found: dict[str, list[JobFile]] = {}
        for chunk in _chunks(job_ids):
            found.update(self._tx(partial(_files_of, job_ids=chunk), write=False))
        return found

    def gc_batch(self, cutoff: float, *, limit: int = 500, now: float | None = None) -> GcBatch:
        """Delete the stored results and file rows of up to ``limit`` terminal jobs that
        finished before ``cutoff``. The jobs and their events stay; each gets a ``gc`` event.
        Returns what went, so the caller can delete cached files nobody names any more."""
        now = time.time() if now is None else now
        terminal = [s.value for s in State if s.terminal]

        def tx(conn: Connection) -> GcBatch:
            has_data = or_(
                exists().where(results.c.job_id == jobs.c.id),
                exists().where(job_files.c.job_id == jobs.c.id),
            )
            ids = list(
                conn.execute(
                    select(jobs.c.id)
                    .where(jobs.c.state.in_(terminal), jobs.c.finished_at < cutoff, has_data)
                    .order_by(jobs.c.finished_at)
                    .limit(limit)
                ).scalars()
            )
            if not ids:
                return GcBatch(job_ids=[], results=0, result_bytes=0, files=[])
            sizes: dict[str, int] = {
                r.job_id: r.size
                for r in conn.execute(
                    select(results.c.job_id, results.c.size).where(results.c.job_id.in_(ids))
                )
            }
            files = _files_of(conn, ids)
            conn.execute(delete(results).where(results.c.job_id.in_(ids)))
            conn.execute(delete(job_files).where(job_files.c.job_id.in_(ids)))
            events = [
                {
                    "job_id": job_id,
                    "at": now,
                    "kind": "gc",
                    "reason": "retention",
                    "detail": {
                        "cutoff": iso(cutoff),
                        "result_bytes": sizes.get(job_id, 0),
                        "files": len(files.get(job_id, [])),
                    },
                }
                for job_id in ids
            ]
            conn.execute(insert(job_events), events)
            return GcBatch(
                job_ids=ids,
                results=len(sizes),
                result_bytes=sum(sizes.values()),
                files=[f for job_id in ids for f in files.get(job_id, [])],
            )

        return self._tx(tx)

    def referenced_sha256(self, digests: Sequence[str]) -> set[str]:
        """Which of these content hashes a ``job_files`` row still names: one cached file
        serves every job whose result has the same bytes."""
        found: set[str] = set()
        for chunk in _chunks(digests):
            found.update(self._tx(partial(_referenced, digests=chunk), write=False))
        return found

    # --- uploads to the CDN (jobs/uploads.py) ---------------------------------------------

    def find_upload(
        self, sha256: str, content_type: str, *, alive_until: float
    ) -> UploadRecord | None:
        """The newest finished upload of these bytes whose URL lives past ``alive_until``."""
        query = (
            select(uploads)
            .where(
                uploads.c.sha256 == sha256,
                uploads.c.content_type == content_type,
                uploads.c.state == "uploaded",
                or_(uploads.c.expires_at.is_(None), uploads.c.expires_at > alive_until),
            )
            .order_by(uploads.c.uploaded_at.desc())
            .limit(1)
        )
        row = self._tx(lambda conn: conn.execute(query).first(), write=False)
        return None if row is None else UploadRecord.from_row(row)

    def find_partial_upload(
        self, sha256: str, content_type: str, part_size: int
    ) -> tuple[UploadRecord, dict[int, str]] | None:
        """A multipart upload of these bytes left unfinished (a killed process), with the
        etags of the parts already sent, so only the missing parts need sending."""

        def tx(conn: Connection) -> tuple[UploadRecord, dict[int, str]] | None:
            row = conn.execute(
                select(uploads)
                .where(
                    uploads.c.sha256 == sha256,
                    uploads.c.content_type == content_type,
                    uploads.c.state == "uploading",
                    uploads.c.part_size == part_size,
                )
                .order_by(uploads.c.created_at.desc())
                .limit(1)
            ).first()
            if row is None:
                return None
            parts = conn.execute(
                select(upload_parts.c.part_number, upload_parts.c.etag).where(
                    upload_parts.c.upload_id == row.id
                )
            ).all()
            return UploadRecord.from_row(row), {n: etag for n, etag in parts}

        return self._tx(tx, write=False)

    def begin_upload(self, new: NewUpload, *, now: float | None = None) -> UploadRecord:
        """Record a multipart upload the CDN has opened (``multipart_id``), in ``uploading``."""
        now = time.time() if now is None else now
        values = {**dataclasses.asdict(new), "id": new_job_id(), "state": "uploading"}
        values["created_at"] = now
        row = self._tx(
            lambda conn: conn.execute(insert(uploads).values(values).returning(*uploads.c)).one()
        )
        return UploadRecord.from_row(row)

    def record_part(
        self, upload_id: str, part_number: int, etag: str, size: int, *, now: float | None = None
    ) -> None:
        """One part reached the CDN (a repeat of the same part overwrites nothing)."""
        now = time.time() if now is None else now

        def tx(conn: Connection) -> None:
            have = conn.execute(
                select(upload_parts.c.etag).where(
                    upload_parts.c.upload_id == upload_id,
                    upload_parts.c.part_number == part_number,
                )
            ).first()
            if have is None:
                conn.execute(
                    insert(upload_parts).values(
                        upload_id=upload_id, part_number=part_number, etag=etag, size=size, at=now
                    )
                )

        self._tx(tx)

    def finish_upload(
        self,
        new: NewUpload,
        *,
        url: str,
        expires_at: float | None,
        upload_id: str | None = None,
        now: float | None = None,
    ) -> UploadRecord:
        """Record a finished upload: the multipart row ``upload_id`` becomes ``uploaded``,
        or (a single upload) a new row is written in ``uploaded``."""
        now = time.time() if now is None else now
        done = {"state": "uploaded", "url": url, "uploaded_at": now, "expires_at": expires_at}

        def tx(conn: Connection) -> Row[Any]:
            if upload_id is not None:
                return conn.execute(
                    update(uploads)
                    .where(uploads.c.id == upload_id)
                    .values(done)
                    .returning(*uploads.c)
                ).one()
            values = {**dataclasses.asdict(new), **done, "id": new_job_id(), "created_at": now}
            return conn.execute(insert(uploads).values(values).returning(*uploads.c)).one()

        return UploadRecord.from_row(self._tx(tx))

    def abandon_upload(self, upload_id: str) -> None:
        """The CDN no longer knows this multipart upload: never resume it."""
        self._tx(
            lambda conn: conn.execute(
                update(uploads)
                .where(uploads.c.id == upload_id, uploads.c.state == "uploading")
                .values(state="abandoned")
            )
        )

    def list_uploads(self, *, limit: int = 100) -> list[UploadRecord]:
        rows = self._tx(
            lambda conn: conn.execute(
                select(uploads).order_by(uploads.c.created_at.desc()).limit(limit)
            ).all(),
            write=False,
        )
        return [UploadRecord.from_row(r) for r in rows]
