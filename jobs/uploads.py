"""Uploading input files to fal's CDN once: content-addressed, resumable, folders zipped.

What happens to a file (see docs/from-fal-client.md for the user's view):

1. It is checked before anything is sent or recorded: it exists, can be read, is not larger
   than ``JOBS_UPLOAD_MAX_BYTES``, and there is a fal key (:class:`UploadError`,
   :class:`ConfigError`). A folder is first zipped deterministically (sorted names, fixed
   timestamps and permissions), so the same folder always gives the same bytes.
2. Its sha256 is looked up in the ``uploads`` table: the same bytes with the same content
   type, uploaded before and alive for at least :data:`REUSE_MARGIN` more, return the
   recorded URL and nothing is sent (``reused=True``).
3. Up to :data:`MULTIPART_THRESHOLD` it goes in one request; above, in
   :data:`PART_SIZE` parts, :data:`PART_CONCURRENCY` at a time. The multipart upload is
   recorded when the CDN opens it and each part as it finishes, so a killed process leaves
   a row that the next upload of the same bytes continues, sending only the missing parts.
4. The lifetime asked for (``JOBS_UPLOAD_TTL``: ``never`` or a duration, default ``30d``)
   is sent as fal's lifecycle preference and recorded as ``expires_at``.

Failures leave nothing recorded as uploaded: a refused or unreachable CDN raises
``ProviderRejected`` / ``ProviderUnavailable``; an unfinished multipart row stays
``uploading`` (resumable), never ``uploaded``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import math
import mimetypes
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .durations import parse_lifetime
from .errors import ConfigError, ProviderProtocolError, ProviderRejected, UploadError
from .records import NewUpload, UploadRecord
from .store import Store

if TYPE_CHECKING:
    from .providers.fal_cdn import FalCdn

MIB = 1024 * 1024
MULTIPART_THRESHOLD = 100 * MIB  # larger files go in parts (as fal_client does)
PART_SIZE = 10 * MIB
PART_CONCURRENCY = 10
REUSE_MARGIN = 3600.0  # a recorded URL is reused only if it lives at least this much longer
HASH_CHUNK = 4 * MIB
ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say: no clock in the bytes
ZIP_MODE = 0o100644 << 16  # a plain readable file, whatever the local permissions
OCTET_STREAM = "application/octet-stream"


def parse_ttl(text: str) -> int | None:
    """Seconds in a ``JOBS_UPLOAD_TTL`` value (``never`` → None): ``90``, ``90s``, ``1h``,
    ``30d``, ``immediate`` (about a minute, as fal_client names it)."""
    try:
        return parse_lifetime(text)
    except ValueError as exc:
        raise ConfigError(f"JOBS_UPLOAD_TTL: {exc}") from None


@dataclass(frozen=True)
class Uploaded:
    """A file on fal's CDN; ``str()`` of it is its URL."""

    url: str
    sha256: str
    size: int
    content_type: str
    reused: bool
    file_name: str | None = None
    uploaded_at: float | None = None
    expires_at: float | None = None

    def __str__(self) -> str:
        return self.url

    @classmethod
    def of(cls, record: UploadRecord, *, reused: bool) -> Uploaded:
        assert record.url is not None
        return cls(
            url=record.url,
            sha256=record.sha256,
            size=record.size,
            content_type=record.content_type,
            reused=reused,
            file_name=record.file_name,
            uploaded_at=record.uploaded_at,
            expires_at=record.expires_at,
        )

    def to_dict(self) -> dict[str, Any]:
        """What ``jobsctl upload`` prints."""
        return {
            "url": self.url,
            "sha256": self.sha256,
            "size": self.size,
            "content_type": self.content_type,
            "reused": self.reused,
        }


class _Source(Protocol):
    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...


@dataclass(frozen=True)
class _Bytes:
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


@dataclass(frozen=True)
class _File:
    path: Path
    size: int

    def read(self, offset: int, length: int) -> bytes:
        with self.path.open("rb") as f:
            f.seek(offset)
            return f.read(length)


def _sha256(source: _Source) -> str:
    digest = hashlib.sha256()
    for offset in range(0, source.size, HASH_CHUNK):
        digest.update(source.read(offset, HASH_CHUNK))
    return digest.hexdigest()


def _readable_file(path: Path) -> int:
    """The size of a regular file we can read, or one clear :class:`UploadError`."""
    try:
        if not path.is_file():
            kind = "does not exist" if not path.exists() else "is not a file or folder"
            raise UploadError(f"cannot upload {str(path)!r}: it {kind}")
        with path.open("rb") as f:
            f.read(1)
        return path.stat().st_size
    except PermissionError:
        raise UploadError(f"cannot upload {str(path)!r}: permission denied") from None
    except OSError as exc:
        raise UploadError(f"cannot upload {str(path)!r}: {exc.strerror or exc}") from None


def _folder_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """Every regular file under ``folder`` as (zip name, path), in sorted name order."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root, name)
            yield path.relative_to(folder).as_posix(), path


def zip_folder(folder: Path, dest: Path) -> None:
    """Zip ``folder`` into ``dest`` so that the same files give the same bytes: sorted
    names, fixed timestamps and modes, no directory entries, deflate at a fixed level."""
    entries = sorted(_folder_files(folder))
    if not entries:
        raise UploadError(f"cannot upload {str(folder)!r}: the folder has no files")
    with zipfile.ZipFile(dest, "w") as archive:
        for name, path in entries:
            _readable_file(path)
            info = zipfile.ZipInfo(name, date_time=ZIP_TIMESTAMP)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = ZIP_MODE
            info.create_system = 3  # unix, so external_attr means the same everywhere
            with path.open("rb") as src, archive.open(info, "w") as out:
                shutil.copyfileobj(src, out, HASH_CHUNK)


def guess_content_type(path: str | os.PathLike[str]) -> str:
    """The content type fal_client would send for this file name."""
    guessed, _ = mimetypes.guess_type(str(path))
    return guessed or OCTET_STREAM


def encode(data: str | bytes, content_type: str) -> str:
    """A ``data:`` URL of the bytes (no request is made), as ``fal_client.encode``."""
    raw = data.encode() if isinstance(data, str) else data
    return f"data:{content_type};base64,{base64.b64encode(raw).decode()}"


def encode_file(path: str | os.PathLike[str]) -> str:
    """A ``data:`` URL of a local file, its type guessed from its name."""
    file = Path(path)
    _readable_file(file)
    return encode(file.read_bytes(), guess_content_type(file))


def image_bytes(image: Any, format: str = "jpeg") -> tuple[bytes, str]:
    """A Pillow image saved in ``format``, and its content type ``image/<format>``."""
    with io.BytesIO() as buffer:
        image.save(buffer, format=format)
        return buffer.getvalue(), f"image/{format}"


def encode_image(image: Any, format: str = "jpeg") -> str:
    """A ``data:`` URL of a Pillow image (``image/<format>``)."""
    return encode(*image_bytes(image, format))


def parse_file_option(text: str) -> tuple[str, str]:
    """``KEY=PATH`` (``--file``) as ``(KEY, PATH)``; KEY may be dotted (``images.0.url``
    is not: only objects are walked)."""
    key, sep, path = text.partition("=")
    key = key.strip()
    if not sep or not key or not path or any(not part for part in key.split(".")):
        raise UploadError(f"--file takes KEY=PATH (KEY may be dotted, e.g. a.b), not {text!r}")
    return key, path


def set_key(arguments: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``arguments`` with dotted ``key`` set to ``value`` (objects made on the way;
    the original is left as it was)."""
    parts = key.split(".")
    result = dict(arguments)
    node = result
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part, {})
        if not isinstance(child, Mapping):
            where = ".".join(parts[: depth + 1])
            raise UploadError(f"cannot set {key}: {where} is not an object in the input")
        node[part] = dict(child)
        node = node[part]
    node[parts[-1]] = value
    return result


def check_path(path: str | os.PathLike[str]) -> None:
    """Refuse, before anything is uploaded, a path that cannot be: missing, unreadable, or a
    folder without files."""
    given = Path(path)
    if given.is_dir():
        if not any(True for _ in _folder_files(given)):
            raise UploadError(f"cannot upload {str(given)!r}: the folder has no files")
        return
    _readable_file(given)


class Uploader:
    """Uploads through one :class:`FalCdn`, recording every upload in the store."""

    def __init__(
        self,
        store: Store,
        cdn: FalCdn,
        *,
        ttl: str = "30d",
        max_bytes: int = 10 * 1024**3,
        threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
        concurrency: int = PART_CONCURRENCY,
        clock: Any = time.time,
    ) -> None:
        self.store = store
        self.cdn = cdn
        self.lifetime = parse_ttl(ttl)
        self.max_bytes = max_bytes
        self.threshold = threshold
        self.part_size = part_size
        self.concurrency = concurrency
        self._clock = clock

    async def upload(
        self, data: str | bytes, content_type: str, file_name: str | None = None
    ) -> Uploaded:
        """Upload bytes (a ``str`` is sent as UTF-8)."""
        raw = data.encode() if isinstance(data, str) else data
        return await self._upload(_Bytes(raw), content_type, file_name)

    async def upload_file(
        self, path: str | os.PathLike[str], *, content_type: str | None = None
    ) -> Uploaded:
        """Upload a file, or a folder as a deterministic zip (``application/zip``)."""
        given = Path(path)
        if given.is_dir():
            with tempfile.TemporaryDirectory(prefix="jobs-upload-") as tmp:
                archive = Path(tmp, (given.resolve().name or "folder") + ".zip")
                await asyncio.to_thread(zip_folder, given, archive)
                size = archive.stat().st_size
                source = _File(archive, size)
                return await self._upload(source, content_type or "application/zip", archive.name)
        size = await asyncio.to_thread(_readable_file, given)
        kind = content_type or guess_content_type(given)
        return await self._upload(_File(given, size), kind, given.name)

    async def upload_inputs(
        self, arguments: Mapping[str, Any], files: Sequence[tuple[str, str | os.PathLike[str]]]
    ) -> tuple[dict[str, Any], list[Uploaded]]:
        """``arguments`` with each dotted key of ``files`` set to its file's URL (uploaded or
        reused). Every path is checked before the first upload, so a bad one sends nothing."""
        for key, path in files:
            set_key(arguments, key, None)
            await asyncio.to_thread(check_path, path)
        result = dict(arguments)
        done = []
        for key, path in files:
            uploaded = await self.upload_file(path)
            result = set_key(result, key, uploaded.url)
            done.append(uploaded)
        return result, done

    async def upload_image(self, image: Any, format: str = "jpeg") -> Uploaded:
        """Upload a Pillow image as ``image/<format>`` (no file name, as fal_client)."""
        data, content_type = image_bytes(image, format)
        return await self._upload(_Bytes(data), content_type, None)

    async def _upload(self, source: _Source, content_type: str, name: str | None) -> Uploaded:
        if source.size > self.max_bytes:
            raise UploadError(
                f"cannot upload {name or 'the data'}: {source.size} bytes is over the limit "
                f"of {self.max_bytes} (JOBS_UPLOAD_MAX_BYTES)"
            )
        if not content_type or "\n" in content_type or "\r" in content_type:
            raise UploadError(f"content type {content_type!r} cannot be sent")
        self.cdn.check()
        if source.size <= self.threshold:
            # read once: the bytes hashed are the bytes sent, even if the file changes
            source = _Bytes(await asyncio.to_thread(source.read, 0, source.size))
        sha256 = await asyncio.to_thread(_sha256, source)
        found = await self._alive(sha256, content_type)
        if found is not None:
            return found
        new = NewUpload(
            sha256=sha256,
            size=source.size,
            content_type=content_type,
            file_name=name,
            lifecycle_seconds=self.lifetime,
        )
        if source.size <= self.threshold:
            url = await self.cdn.upload(
                source.read(0, source.size),
                content_type=content_type,
                file_name=name,
                lifetime_seconds=self.lifetime,
            )
            return await self._finished(new, url, None)
        return await self._multipart(source, new)

    async def _alive(self, sha256: str, content_type: str) -> Uploaded | None:
        """The recorded upload of these bytes, if its URL lives long enough to be reused."""
        margin = REUSE_MARGIN if self.lifetime is None else min(REUSE_MARGIN, self.lifetime / 2)
        found = await self.store.aio.run(
            self.store.find_upload, sha256, content_type, alive_until=self._clock() + margin
        )
        return None if found is None else Uploaded.of(found, reused=True)

    async def _finished(self, new: NewUpload, url: str, upload_id: str | None) -> Uploaded:
        now = self._clock()
        expires = None if self.lifetime is None else now + self.lifetime
        record = await self.store.aio.run(
            self.store.finish_upload, new, url=url, expires_at=expires, upload_id=upload_id, now=now
        )
        return Uploaded.of(record, reused=False)

    async def _multipart(self, source: _Source, new: NewUpload) -> Uploaded:
        partial = await self.store.aio.run(
            self.store.find_partial_upload, new.sha256, new.content_type, self.part_size
        )
        if partial is not None:
            record, etags = partial
            try:
                return await self._send_parts(source, new, record, etags)
            except (ProviderRejected, ProviderProtocolError):
                # The CDN no longer knows that upload (expired, or another process completed
                # it: then its URL is recorded now); else start over.
                await self.store.aio.run(self.store.abandon_upload, record.id)
                done = await self._alive(new.sha256, new.content_type)
                if done is not None:
                    return done
        ref = await self.cdn.initiate(
            content_type=new.content_type, file_name=new.file_name, lifetime_seconds=self.lifetime
        )
        opened = dataclasses.replace(
            new, part_size=self.part_size, multipart_id=ref.upload_id, access_url=ref.access_url
        )
        record = await self.store.aio.run(self.store.begin_upload, opened)
        return await self._send_parts(source, new, record, {})

    async def _send_parts(
        self, source: _Source, new: NewUpload, record: UploadRecord, done: Mapping[int, str]
    ) -> Uploaded:
        from .providers.fal_cdn import MultipartRef

        assert record.access_url is not None and record.multipart_id is not None
        ref = MultipartRef(access_url=record.access_url, upload_id=record.multipart_id)
        count = max(1, math.ceil(source.size / self.part_size))
        etags = dict(done)
        gate = asyncio.Semaphore(self.concurrency)

        async def send(number: int) -> None:
            async with gate:
                offset = (number - 1) * self.part_size
                data = await asyncio.to_thread(source.read, offset, self.part_size)
                etag = await self.cdn.upload_part(ref, number, data, content_type=new.content_type)
                await self.store.aio.run(self.store.record_part, record.id, number, etag, len(data))
                etags[number] = etag

        missing = [n for n in range(1, count + 1) if n not in etags]
        tasks = [asyncio.create_task(send(n)) for n in missing]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # one part failed: stop the others; the finished ones stay recorded (resumable)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        url = await self.cdn.complete(ref, etags)
        return await self._finished(new, url, record.id)

    async def close(self) -> None:
        await self.cdn.close()
