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
- Only public internet addresses are connected to, checked on the address actually
  connected to after every redirect (:mod:`jobs.egress`); ``JOBS_CACHE_ALLOW_HOSTS`` opens
  private hosts on purpose. A URL with credentials in it (``https://user:pw@host/``) is
  refused: they would be sent.
- Downloads share ``concurrency`` slots, and one host gets at most ``host_slots`` of them,
  so files on a few slow hosts cannot hold every slot while the others wait.
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
import unicodedata
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from .config import (
    DEFAULT_CACHE_FILE_TIMEOUT,
    DEFAULT_CACHE_HOST_SLOTS,
    DEFAULT_CACHE_MAX_FILE_BYTES,
    decimal,
)
from .egress import AddressPolicy, GuardedResolver, refusal_in
from .errors import ConfigError
from .providers import file_reader
from .providers.http import RETRY_STATUSES, RetryPolicy, make_client, parse_retry_after
from .records import JobFile, NewFile, iso
from .store import Store

log = logging.getLogger(__name__)

PENDING = "pending"
DOWNLOADED = "downloaded"
FAILED = "failed"

DEFAULT_CONCURRENCY = 16  # downloads at once, per process
DEFAULT_ATTEMPTS = 3  # per file, for transient failures (transport errors, 408/429/5xx)
MAX_REDIRECTS = 5
CHUNK_BYTES = 64 * 1024
DRAIN_ON_CLOSE = 30.0  # seconds aclose() lets running downloads finish before cancelling
STALE_TEMP = 3600.0  # temp files older than this are leftovers of a crash; gc removes them
TEMP_DIR = "tmp"
MAX_COLUMN_TEXT = 255  # job_files.file_name and content_type (jobs/db.py)
MAX_NAME_BYTES = 255  # the longest file name most file systems accept
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f/\\:]")


class DownloadError(Exception):
    """A file could not be fetched; the message is what ``job_files.error`` records."""


class _Transient(DownloadError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# --- finding files in a result -------------------------------------------------------------


def find_files(result: Any, provider: str) -> list[NewFile]:
    """Every file in a ``provider`` result (what its :func:`jobs.providers.file_reader`
    recognises: fal's File objects, Replicate's output URLs), in document order, with its
    JSON path."""
    file_of = file_reader(provider)
    found: list[NewFile] = []
    stack: list[tuple[Any, str]] = [(result, "$")]
    while stack:
        value, path = stack.pop()
        seen = file_of(value)
        if seen is not None:
            url, file_name, content_type = seen
            found.append(
                NewFile(
                    n=len(found),
                    url=url.replace("\x00", "%00"),
                    json_path=path,
                    file_name=_text(file_name),
                    content_type=_text(content_type),
                )
            )
            continue
        if isinstance(value, Mapping):
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
    """A name the ``job_files`` columns can hold (VARCHAR(255), no NUL on PostgreSQL): the
    remote service chose it, and one unfit value must not leave all the files unrecorded."""
    if not isinstance(value, str):
        return None
    return value.replace("\x00", "")[:MAX_COLUMN_TEXT] or None


def check_url(url: str, policy: AddressPolicy | None = None) -> httpx.URL:
    """The URL if it may be fetched (absolute http or https, no credentials, and with
    ``policy`` an IP literal it allows); else :class:`DownloadError`."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise DownloadError("refused: not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        kind = f"a {parsed.scheme}: URL" if parsed.scheme else "a local path"
        raise DownloadError(f"refused: only http(s) URLs are downloaded, not {kind}")
    if parsed.userinfo:
        raise DownloadError("refused: the URL carries credentials (user:password@)")
    refused = policy.check_url_host(parsed.host) if policy is not None else None
    if refused is not None:
        raise DownloadError(refused)
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
        host_slots: int = DEFAULT_CACHE_HOST_SLOTS,
        allow_hosts: Sequence[str] = (),
        client: httpx.AsyncClient | None = None,
    ) -> None:
        """``client`` (tests pass a mock) is closed by :meth:`aclose`, like the one made here;
        a client passed in connects wherever its transport does (IP literals and redirects
        are still checked). ``allow_hosts`` is ``JOBS_CACHE_ALLOW_HOSTS``."""
        self.store = store
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.retry = RetryPolicy(attempts=attempts, base=0.5, cap=5.0)
        self.policy = AddressPolicy(allow_hosts)
        self._client = client
        self._concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._host_slots = host_slots
        # Per host: its slots and how many downloads hold or await them (dropped at zero, so
        # the map stays as small as the set of hosts in use).
        self._per_host: dict[str, tuple[asyncio.Semaphore, int]] = {}
        self._background: dict[str, asyncio.Task[None]] = {}

    def path_for(self, sha256: str) -> Path:
        return cache_path(self.root, sha256)

    async def entries(self, job_id: str) -> list[JobFile]:
        """The job's file rows as recorded (no download)."""
        return await self.store.aio.run(self.store.files, job_id)

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
        found, result = await self.store.aio.run(self.store.result, job_id)
        if not found:
            return await self.store.aio.run(self.store.files, job_id)
        job = await self.store.aio.run(self.store.get, job_id)
        files = find_files(result, job.provider)
        rows = await self.store.aio.run(self.store.add_files, job_id, files)
        todo = [f for f in rows if self._needs_download(f, retry_failed)]
        if not todo:
            return rows
        _check_directory(self.root, "the file cache (JOBS_CACHE_DIR)")
        await asyncio.gather(*(self._download_file(f) for f in todo))
        return await self.store.aio.run(self.store.files, job_id)

    def _needs_download(self, file: JobFile, retry_failed: bool) -> bool:
        if file.state == PENDING:
            return True
        if file.state == FAILED:
            return retry_failed
        return self.cached(file) is None

    @contextlib.asynccontextmanager
    async def _host_slot(self, url: str) -> AsyncIterator[None]:
        try:
            host = httpx.URL(url).host
        except (httpx.InvalidURL, TypeError, ValueError):
            host = ""
        slots, users = self._per_host.get(host, (asyncio.Semaphore(self._host_slots), 0))
        self._per_host[host] = (slots, users + 1)
        try:
            async with slots:
                yield
        finally:
            slots, users = self._per_host[host]
            if users == 1:
                del self._per_host[host]
            else:
                self._per_host[host] = (slots, users - 1)

    async def _download_file(self, file: JobFile) -> None:
        # The host's slot first: a file waiting on a busy host holds no shared slot.
        async with self._host_slot(file.url), self._slots:
            error: str | None = None
            try:
                sha256, size, content_type = await self.download(file.url)
            except DownloadError as exc:
                error = str(exc)
            except Exception as exc:  # recorded, so the row never stays pending forever
                log.exception("downloading %s failed unexpectedly", file.url)
                error = f"internal error: {type(exc).__name__}"
            if error is not None:
                await self.store.aio.run(
                    self.store.set_file, file.job_id, file.n, state=FAILED, error=error
                )
                return
        await self.store.aio.run(
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
        check_url(url, self.policy)
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
                max_connections=self._concurrency * 2,
                timeout=httpx.Timeout(60.0, connect=10.0),
                resolver=GuardedResolver(self.policy),
            )
        return self._client

    async def _attempt(self, url: str) -> tuple[str, int, str | None]:
        target = httpx.URL(url)
        for _ in range(MAX_REDIRECTS + 1):
            try:
                async with self._http().stream("GET", target) as response:
                    code = response.status_code
                    if response.is_redirect:
                        location = response.url.join(response.headers["location"])
                        target = check_url(str(location), self.policy)
                        continue
                    if code in RETRY_STATUSES:
                        retry_after = parse_retry_after(response.headers.get("retry-after"))
                        raise _Transient(f"HTTP {code}", retry_after)
                    if code != 200:
                        raise DownloadError(f"HTTP {code} {response.reason_phrase}".rstrip())
                    declared = decimal(response.headers.get("content-length", ""))
                    if declared is not None and declared > self.max_bytes:
                        raise DownloadError(self._too_large(declared))
                    sha256, size = await self._save(response)
                    return sha256, size, response.headers.get("content-type")
            except httpx.TransportError as exc:
                refused = refusal_in(exc)
                if refused is not None:
                    raise DownloadError(str(refused)) from None
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
        _check_directory(dest, "the target folder")
        dest.mkdir(parents=True, exist_ok=True)
        saved = []
        for file in files:
            source = self.cached(file)
            if source is None:
                saved.append(SavedFile(file=file, name=None))
                continue
            name = _copy_new(source, dest, safe_name(file), taken)
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


def _check_directory(path: Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a file, not a directory")


def _copy_new(source: Path, dest: Path, name: str, taken: set[str]) -> str:
    """Copy ``source`` into ``dest`` under ``name`` or the first free variant of it, and
    return the name used. Nothing in ``dest`` is overwritten and no link in it is followed
    (``O_EXCL | O_NOFOLLOW``); a file already there with the same bytes (an earlier copy of
    this one) is reused, so running the same command twice copies nothing twice."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(1000):  # bounded: each round takes a name no one had taken
        candidate = unique_name(name, taken)
        target = dest / candidate
        try:
            fd = os.open(target, flags, 0o644)
        except FileExistsError:
            if _same_file(source, target):
                return candidate
            continue
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out)
        return candidate
    raise OSError(f"no free name for {name!r} in {dest}")


def _same_file(source: Path, target: Path) -> bool:
    if target.is_symlink() or not target.is_file():
        return False
    if target.stat().st_size != source.stat().st_size:
        return False
    with source.open("rb") as a, target.open("rb") as b:
        while True:
            left, right = a.read(CHUNK_BYTES), b.read(CHUNK_BYTES)
            if left != right:
                return False
            if not left:
                return True


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
    """A file name that stays inside the target folder and reads as what it is: the
    result's ``file_name``, else the URL's last segment, else ``<job>-<n>``; an extension
    from the content type if none. Separators and control characters become ``_``; format
    characters (bidirectional overrides that make ``gpj.exe`` read as ``exe.jpg``,
    zero-width marks) are dropped; a leading ``-`` (read as an option by shell tools)
    becomes ``_``; the name fits in 255 bytes, its extension kept."""
    candidates = [file.file_name or "", _url_name(file.url)]
    for raw in candidates:
        last = raw.replace("\\", "/").rsplit("/", 1)[-1]
        visible = "".join(c for c in last if unicodedata.category(c) != "Cf")
        name = _UNSAFE_NAME.sub("_", visible).strip(" .")
        if name:
            break
    else:
        name = f"{file.job_id}-{file.n}"
    if name.startswith("-"):
        name = "_" + name[1:]
    if not Path(name).suffix and file.content_type:
        name += mimetypes.guess_extension(file.content_type.split(";")[0].strip()) or ""
    return _fit_bytes(name, MAX_NAME_BYTES)


def _url_name(url: str) -> str:
    try:
        return httpx.URL(url).path.rsplit("/", 1)[-1]
    except (httpx.InvalidURL, TypeError, ValueError):
        return ""


def _fit_bytes(name: str, limit: int) -> str:
    """``name`` cut (in its stem) to at most ``limit`` bytes of UTF-8."""
    if len(name.encode()) <= limit:
        return name
    suffix = Path(name).suffix
    if len(suffix.encode()) > limit // 4:
        suffix = ""
    stem = name[: len(name) - len(suffix)] if suffix else name
    room = limit - len(suffix.encode())
    return stem.encode()[:room].decode(errors="ignore") + suffix


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
