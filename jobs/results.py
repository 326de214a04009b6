"""Result files: find them in a result, download each once into a content-addressed cache,
copy them out, and let retention delete them.

Why it is built this way:

- fal hands media back as URLs that expire (docs/protocol.md §7), so a job that asked
  for its files (``jobs submit --download``, ``JOBS_CACHE_FILES=1``) has them fetched as soon
  as it succeeds: in the background, a bounded number at a time, so the poll tick never
  waits on a download.
- The cache is keyed by SHA-256 (``<cache>/ab/abcdef…``): identical outputs are stored once,
  a half-written file is never visible (a temp file in ``<cache>/tmp``, then an atomic
  rename), and gc may delete a file as soon as no ``job_files`` row names its hash.
- Every file found gets a ``job_files`` row, ``pending`` then ``downloaded`` or ``failed``
  with the reason: a failure is on record, never a silent gap. Rows a crash left
  ``pending`` (and files that vanished from disk) are fetched by the next :meth:`fetch`.
- The URLs come from a remote service's output, so they are treated as untrusted: only
  http(s) is fetched (never a local path, ``file://``, ``data:`` or a redirect to any of
  them), no credentials are sent, and every file is capped in size and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import mimetypes
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from .config import DEFAULT_CACHE_FILE_TIMEOUT, DEFAULT_CACHE_MAX_FILE_BYTES
from .providers.http import RETRY_STATUSES, RetryPolicy, make_client, parse_retry_after
from .store import JobFile, NewFile, Store, iso

log = logging.getLogger(__name__)

PENDING = "pending"
DOWNLOADED = "downloaded"
FAILED = "failed"

DEFAULT_CONCURRENCY = 8  # downloads at once, per process
DEFAULT_ATTEMPTS = 3  # per file, for transient failures (transport errors, 408/429/5xx)
MAX_REDIRECTS = 5
CHUNK_BYTES = 64 * 1024
DRAIN_ON_CLOSE = 30.0  # seconds aclose() lets running downloads finish before cancelling
STALE_TEMP = 3600.0  # temp files older than this are leftovers of a crash; gc removes them
TEMP_DIR = "tmp"
FILE_KEYS = ("content_type", "file_name", "file_size")  # besides "url": a fal File object
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f/\\:]")


class DownloadError(Exception):
    """A file could not be fetched; the message is what ``job_files.error`` records."""


class _Transient(DownloadError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# --- finding files in a result -------------------------------------------------------------


def find_files(result: Any) -> list[NewFile]:
    """Every fal File/Image object in a result (a mapping with a string ``url`` and one of
    ``content_type``, ``file_name``, ``file_size``), in document order, with its JSON path."""
    found: list[NewFile] = []
    stack: list[tuple[Any, str]] = [(result, "$")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, Mapping):
            url = value.get("url")
            if isinstance(url, str) and any(k in value for k in FILE_KEYS):
                found.append(
                    NewFile(
                        n=len(found),
                        url=url,
                        json_path=path,
                        file_name=_text(value.get("file_name")),
                        content_type=_text(value.get("content_type")),
                    )
                )
                continue
            children = [(item, _child_path(path, str(key))) for key, item in value.items()]
        elif isinstance(value, list):
            children = [(item, f"{path}[{i}]") for i, item in enumerate(value)]
        else:
            continue
        stack.extend(reversed(children))
    return found


def _child_path(path: str, key: str) -> str:
    return f"{path}.{key}" if _IDENTIFIER.match(key) else f"{path}[{json.dumps(key)}]"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def check_url(url: str) -> httpx.URL:
    """The URL if it may be fetched (absolute http or https); else :class:`DownloadError`."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        raise DownloadError("refused: not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        kind = f"a {parsed.scheme}: URL" if parsed.scheme else "a local path"
        raise DownloadError(f"refused: only http(s) URLs are downloaded, not {kind}")
    return parsed


# --- the cache -----------------------------------------------------------------------------


class FileCache:
    """Downloads result files into ``root`` and records them in ``job_files``.

    One per :class:`~jobs.manager.AsyncJobManager` (``manager.files``). ``schedule`` starts a
    job's downloads in the background; ``fetch`` does them now (and first waits for a
    background run of the same job); ``drain`` waits for the background ones.
    """

    def __init__(
        self,
        store: Store,
        root: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_CACHE_MAX_FILE_BYTES,
        timeout: float = DEFAULT_CACHE_FILE_TIMEOUT,
        attempts: int = DEFAULT_ATTEMPTS,
        concurrency: int = DEFAULT_CONCURRENCY,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        """``client`` (tests pass a mock) is closed by :meth:`aclose`, like the one made here."""
        self.store = store
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.retry = RetryPolicy(attempts=attempts, base=0.5, cap=5.0)
        self._client = client
        self._concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._background: dict[str, asyncio.Task[None]] = {}

    def path_for(self, sha256: str) -> Path:
        return cache_path(self.root, sha256)

    async def entries(self, job_id: str) -> list[JobFile]:
        """The job's file rows as recorded (no download)."""
        return await asyncio.to_thread(self.store.files, job_id)

    def cached(self, file: JobFile) -> Path | None:
        """Where a downloaded file is, or None (not downloaded, or removed from disk)."""
        if file.state != DOWNLOADED or not file.sha256:
            return None
        path = self.path_for(file.sha256)
        return path if path.is_file() else None

    # --- downloading ---------------------------------------------------------------------

    def schedule(self, job_id: str) -> None:
        """Fetch a job's files in the background (the manager calls this when a job that
        asked for its files succeeds). Returns at once; :meth:`drain` waits."""
        if job_id in self._background:
            return
        task = asyncio.get_running_loop().create_task(self._run_in_background(job_id))
        self._background[job_id] = task
        task.add_done_callback(lambda _: self._background.pop(job_id, None))

    async def _run_in_background(self, job_id: str) -> None:
        try:
            await self._fetch(job_id, retry_failed=False)
        except Exception:  # the rows stay pending: the next fetch() of this job retries
            log.exception("downloading the files of job %s failed", job_id)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for background downloads (at most ``timeout`` seconds)."""
        if self._background:
            await asyncio.wait(set(self._background.values()), timeout=timeout)

    async def fetch(self, job_id: str, *, retry_failed: bool = False) -> list[JobFile]:
        """Record the files of the job's stored result and download those not in the cache
        (and, with ``retry_failed``, those that failed before); return the job's file rows."""
        running = self._background.get(job_id)
        if running is not None:
            await asyncio.wait({running})
        return await self._fetch(job_id, retry_failed=retry_failed)

    async def _fetch(self, job_id: str, *, retry_failed: bool) -> list[JobFile]:
        found, result = await asyncio.to_thread(self.store.result, job_id)
        if not found:
            return await asyncio.to_thread(self.store.files, job_id)
        rows = await asyncio.to_thread(self.store.add_files, job_id, find_files(result))
        todo = [f for f in rows if self._needs_download(f, retry_failed)]
        if not todo:
            return rows
        await asyncio.gather(*(self._download_file(f) for f in todo))
        return await asyncio.to_thread(self.store.files, job_id)

    def _needs_download(self, file: JobFile, retry_failed: bool) -> bool:
        if file.state == PENDING:
            return True
        if file.state == FAILED:
            return retry_failed
        return self.cached(file) is None

    async def _download_file(self, file: JobFile) -> None:
        async with self._slots:
            try:
                sha256, size, content_type = await self.download(file.url)
            except DownloadError as exc:
                await asyncio.to_thread(
                    self.store.set_file, file.job_id, file.n, state=FAILED, error=str(exc)
                )
                return
        await asyncio.to_thread(
            self.store.set_file,
            file.job_id,
            file.n,
            state=DOWNLOADED,
            sha256=sha256,
            size=size,
            content_type=content_type,
        )

    async def download(self, url: str) -> tuple[str, int, str | None]:
        """Fetch ``url`` into the cache; return ``(sha256, size, content type)``. Retries
        transient failures; raises :class:`DownloadError` with the reason otherwise."""
        check_url(url)
        try:
            async with asyncio.timeout(self.timeout):
                attempt = 1
                while True:
                    try:
                        return await self._attempt(url)
                    except _Transient as exc:
                        if attempt >= self.retry.attempts:
                            raise DownloadError(
                                f"{exc} (gave up after {attempt} attempts)"
                            ) from None
                        await asyncio.sleep(self.retry.delay(attempt, exc.retry_after))
                        attempt += 1
        except TimeoutError:
            raise DownloadError(f"not finished within {self.timeout:g} s") from None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = make_client(
                max_connections=self._concurrency * 2, timeout=httpx.Timeout(60.0, connect=10.0)
            )
        return self._client

    async def _attempt(self, url: str) -> tuple[str, int, str | None]:
        target = httpx.URL(url)
        for _ in range(MAX_REDIRECTS + 1):
            try:
                async with self._http().stream("GET", target) as response:
                    code = response.status_code
                    if response.is_redirect:
                        target = check_url(str(response.url.join(response.headers["location"])))
                        continue
                    if code in RETRY_STATUSES:
                        retry_after = parse_retry_after(response.headers.get("retry-after"))
                        raise _Transient(f"HTTP {code}", retry_after)
                    if code != 200:
                        raise DownloadError(f"HTTP {code} {response.reason_phrase}".rstrip())
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > self.max_bytes:
                        raise DownloadError(self._too_large(int(declared)))
                    sha256, size = await self._save(response)
                    return sha256, size, response.headers.get("content-type")
            except httpx.TransportError as exc:
                raise _Transient(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        raise DownloadError(f"more than {MAX_REDIRECTS} redirects")

    def _too_large(self, size: int | None) -> str:
        seen = f"{size} bytes" if size is not None else "more"
        return f"too large: {seen}, the cap is {self.max_bytes} bytes (JOBS_CACHE_MAX_FILE_BYTES)"

    async def _save(self, response: httpx.Response) -> tuple[str, int]:
        """Stream the body to a temp file, hashing as it goes; rename it into place."""
        temp_dir = self.root / TEMP_DIR
        temp_dir.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=temp_dir, suffix=".part")
        digest = hashlib.sha256()
        size = 0
        out = os.fdopen(fd, "wb")
        try:
            async for chunk in response.aiter_bytes(CHUNK_BYTES):
                size += len(chunk)
                if size > self.max_bytes:
                    raise DownloadError(self._too_large(None))
                digest.update(chunk)
                out.write(chunk)
            sha256 = digest.hexdigest()
            await asyncio.to_thread(_commit, out, temp, self.path_for(sha256))
        except BaseException:
            out.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        return sha256, size

    async def aclose(self) -> None:
        """Let running downloads finish (briefly), cancel the rest, close the HTTP client.
        Cancelled files stay ``pending``; the next :meth:`fetch` of their job completes them."""
        await self.drain(DRAIN_ON_CLOSE)
        tasks = list(self._background.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # --- copying out -----------------------------------------------------------------------

    async def save(
        self, job_id: str, dest: str | os.PathLike[str], *, retry_failed: bool = True
    ) -> list[SavedFile]:
        """Download what is missing, then copy the job's files into ``dest`` under their
        file names (``jobs result JOB --files DIR``)."""
        files = await self.fetch(job_id, retry_failed=retry_failed)
        return await asyncio.to_thread(self.copy_out, files, Path(dest), set())

    def copy_out(self, files: Sequence[JobFile], dest: Path, taken: set[str]) -> list[SavedFile]:
        """Copy cached files into ``dest``, each under its file name made safe and unique
        among ``taken`` (names already used in this copy; updated). Blocking."""
        dest.mkdir(parents=True, exist_ok=True)
        saved = []
        for file in files:
            source = self.cached(file)
            if source is None:
                saved.append(SavedFile(file=file, name=None))
                continue
            name = unique_name(safe_name(file), taken)
            shutil.copyfile(source, dest / name)
            saved.append(SavedFile(file=file, name=name))
        return saved


@dataclass(frozen=True)
class SavedFile:
    """A file of a job and the name it was copied under (None: not in the cache)."""

    file: JobFile
    name: str | None

    def to_dict(self, prefix: str = "") -> dict[str, Any]:
        data = self.file.to_dict()
        data["path"] = f"{prefix}{self.name}" if self.name is not None else None
        return data


def cache_path(root: Path, sha256: str) -> Path:
    """Where the file with this SHA-256 lives: ``<root>/ab/abcdef…``."""
    return root / sha256[:2] / sha256


def _commit(out: IO[bytes], temp: str, final: Path) -> None:
    out.flush()
    os.fsync(out.fileno())
    out.close()
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(temp, final)


def safe_name(file: JobFile) -> str:
    """A file name that stays inside the target folder: the result's ``file_name``, else the
    URL's last segment, else ``<job>-<n>``; an extension from the content type if none."""
    candidates = [file.file_name or "", httpx.URL(file.url).path.rsplit("/", 1)[-1]]
    for raw in candidates:
        name = _UNSAFE_NAME.sub("_", raw.replace("\\", "/").rsplit("/", 1)[-1]).strip(" .")
        if name:
            break
    else:
        name = f"{file.job_id}-{file.n}"
    if not Path(name).suffix and file.content_type:
        name += mimetypes.guess_extension(file.content_type.split(";")[0].strip()) or ""
    return name[-200:]


def unique_name(name: str, taken: set[str]) -> str:
    """``name``, or ``stem-2.ext``, ``stem-3.ext``…: the first not in ``taken`` (compared
    without case, for case-insensitive file systems); records the choice in ``taken``."""
    path = Path(name)
    candidate, k = name, 1
    while candidate.lower() in taken:
        k += 1
        candidate = f"{path.stem}-{k}{path.suffix}"
    taken.add(candidate.lower())
    return candidate


# --- retention -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GcReport:
    """What ``jobs gc`` freed."""

    cutoff: float
    jobs: int
    results: int
    result_bytes: int
    file_rows: int
    files: int
    file_bytes: int
    temp_files: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "cutoff": iso(self.cutoff),
            "jobs": self.jobs,
            "results": self.results,
            "result_bytes": self.result_bytes,
            "file_rows": self.file_rows,
            "files": self.files,
            "file_bytes": self.file_bytes,
            "temp_files": self.temp_files,
            "bytes": self.result_bytes + self.file_bytes,
        }


def collect_garbage(
    store: Store, root: str | os.PathLike[str], cutoff: float, *, batch_size: int = 500
) -> GcReport:
    """Remove stored results, ``job_files`` rows and cached files of terminal jobs finished
    before ``cutoff`` (jobs and events stay), and temp files a crash left. Blocking.

    A cached file is deleted only when no remaining row names its hash (identical files
    are shared between jobs)."""
    jobs = results = result_bytes = 0
    digests: set[str] = set()
    file_rows = 0
    while True:
        batch = store.gc_batch(cutoff, limit=batch_size)
        if not batch.job_ids:
            break
        jobs += len(batch.job_ids)
        results += batch.results
        result_bytes += batch.result_bytes
        file_rows += len(batch.files)
        digests.update(f.sha256 for f in batch.files if f.sha256)
    still_used = store.referenced_sha256(sorted(digests))
    files = file_bytes = 0
    for sha256 in digests - still_used:
        path = cache_path(Path(root), sha256)
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            path.unlink()
            files += 1
            file_bytes += size
    return GcReport(
        cutoff=cutoff,
        jobs=jobs,
        results=results,
        result_bytes=result_bytes,
        file_rows=file_rows,
        files=files,
        file_bytes=file_bytes,
        temp_files=_remove_stale_temp(Path(root) / TEMP_DIR),
    )


def _remove_stale_temp(temp_dir: Path) -> int:
    if not temp_dir.is_dir():
        return 0
    removed = 0
    limit = time.time() - STALE_TEMP
    for path in temp_dir.glob("*.part"):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime < limit:
                path.unlink()
                removed += 1
    return removed


__all__ = [
    "DOWNLOADED",
    "FAILED",
    "PENDING",
    "DownloadError",
    "FileCache",
    "GcReport",
    "SavedFile",
    "cache_path",
    "check_url",
    "collect_garbage",
    "find_files",
    "safe_name",
    "unique_name",
]
