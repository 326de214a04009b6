"""Serving the emulators: in a background thread for tests, blocking for the CLI.

Tests and benchmarks want a real socket (the code under test opens its own HTTP clients,
possibly in other processes), so :class:`FakeFalServer` (and :class:`FakeReplicateServer`,
the same machinery around the Replicate emulator) runs uvicorn in a daemon thread on
a port it binds itself (port 0 gives a free one, known before the server starts). With
``ssl=True`` it serves HTTPS with a throw-away ``trustme`` certificate authority, because
``fal_client`` only ever builds ``https://`` URLs; point a client at ``ca_cert_path``
(e.g. ``SSL_CERT_FILE``) or use :meth:`FakeFalServer.client_ssl_context`.

The access log is off: it costs about 30 % of uvicorn's throughput (docs/serve.md).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl as ssl_module
import tempfile
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from jobs.testing.fal_emulator import FakeFal
from jobs.testing.fal_model import FakeFalConfig, FakeFalStats
from jobs.testing.replicate_emulator import FakeReplicate
from jobs.testing.replicate_model import FakeReplicateConfig, FakeReplicateStats

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
GRACEFUL_SHUTDOWN = 1
BACKLOG = 4096


App = TypeVar("App")


def _uvicorn_config(fake: Any, log_level: str, **extra: Any) -> uvicorn.Config:
    return uvicorn.Config(
        fake,
        lifespan="on",
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
        backlog=BACKLOG,
        **extra,
    )


def run_fake_fal(
    host: str = "127.0.0.1",
    port: int = 8000,
    config: FakeFalConfig | None = None,
    *,
    private_key: Ed25519PrivateKey | None = None,
    log_level: str = "warning",
    on_listening: Callable[[str], None] = lambda _url: None,
) -> None:
    """Serve the emulator until interrupted (SIGINT/SIGTERM); used by ``jobsctl fake-fal``.
    ``on_listening`` gets the base URL once the socket is bound (port 0: a free one)."""
    _serve(FakeFal(config, private_key=private_key), host, port, log_level, on_listening)


def run_fake_replicate(
    host: str = "127.0.0.1",
    port: int = 8000,
    config: FakeReplicateConfig | None = None,
    *,
    log_level: str = "warning",
    on_listening: Callable[[str], None] = lambda _url: None,
) -> None:
    """Serve the Replicate emulator until interrupted; used by ``jobsctl fake-replicate``.
    ``on_listening`` gets the base URL once the socket is bound (port 0: a free one)."""
    _serve(FakeReplicate(config), host, port, log_level, on_listening)


def _serve(
    fake: Any, host: str, port: int, log_level: str, on_listening: Callable[[str], None]
) -> None:
    sock = _bind(host, port)
    sock.listen(BACKLOG)  # before announcing: early connections wait in the backlog
    bound = sock.getsockname()[1]
    on_listening(f"http://[{host}]:{bound}" if ":" in host else f"http://{host}:{bound}")
    uvicorn.Server(_uvicorn_config(fake, log_level)).run(sockets=[sock])


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class _BackgroundServer(Generic[App]):
    """An emulator app on a real socket in a background thread; a context manager.

    ``ssl`` is False (plain HTTP), True (a fresh trustme CA), or a ``trustme.CA`` to issue
    the certificate from. ``url`` is the base URL (no trailing slash), ``fake`` the live
    app whose ``stats`` and ``config`` a test reads and changes in-process.
    """

    _label = "fake"

    def __init__(self, fake: App, host: str, port: int, ssl: bool | Any, log_level: str) -> None:
        self.fake: App = fake
        self.host = host
        self.port = port
        self.ca: Any = None
        self.ca_cert_path: str | None = None
        self._ssl = ssl
        self._log_level = log_level
        self._tmpdir: str | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl is not False else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def client_ssl_context(self) -> ssl_module.SSLContext:
        """An SSL context that trusts this server's certificate (for httpx ``verify=``)."""
        if self.ca is None:
            raise RuntimeError("this server was started without ssl")
        context = ssl_module.create_default_context()
        self.ca.configure_trust(context)
        return context

    def _tls_files(self) -> dict[str, Any]:
        if self._ssl is False:
            return {}
        import trustme  # a test dependency: imported only when TLS is asked for

        self.ca = trustme.CA() if self._ssl is True else self._ssl
        cert = self.ca.issue_cert("127.0.0.1", "localhost", "::1")
        self._tmpdir = tempfile.mkdtemp(prefix=f"{self._label}-tls-")
        chain = os.path.join(self._tmpdir, "server.pem")
        cert.private_key_and_cert_chain_pem.write_to_path(chain)
        self.ca_cert_path = os.path.join(self._tmpdir, "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_cert_path)
        return {"ssl_certfile": chain, "ssl_keyfile": chain}

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        sock = _bind(self.host, self.port)
        try:
            self.port = sock.getsockname()[1]
            tls = self._tls_files()
        except BaseException:
            sock.close()
            self._cleanup()
            raise
        # log_config=None: leave the process's logging alone (pytest captures uvicorn's).
        config = _uvicorn_config(self.fake, self._log_level, log_config=None, **tls)
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=self._label, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                sock.close()
                raise RuntimeError(f"the {self._label} server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(STOP_TIMEOUT)
            if thread.is_alive():
                server.force_exit = True
                thread.join(STOP_TIMEOUT)
        self._server = self._thread = None
        self._cleanup()

    def _cleanup(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class FakeFalServer(_BackgroundServer[FakeFal]):
    """The fal emulator on a real socket in a background thread; a context manager.

    ``ssl`` is False (plain HTTP), True (a fresh trustme CA), or a ``trustme.CA`` to issue
    the certificate from. ``url`` is the base URL (no trailing slash), ``fake`` the live
    :class:`FakeFal` whose ``stats`` and ``config`` a test reads and changes in-process.
    """

    _label = "fake-fal"

    def __init__(
        self,
        config: FakeFalConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl: bool | Any = False,
        *,
        private_key: Ed25519PrivateKey | None = None,
        log_level: str = "warning",
    ) -> None:
        super().__init__(FakeFal(config, private_key=private_key), host, port, ssl, log_level)

    @property
    def config(self) -> FakeFalConfig:
        return self.fake.config

    @property
    def stats(self) -> FakeFalStats:
        return self.fake.stats

    @property
    def run_url(self) -> str:
        """The stand-in for fal's direct host (``JOBS_FAL_RUN_URL``): see ``fal_run.py``."""
        return self.url + "/_run"


class FakeReplicateServer(_BackgroundServer[FakeReplicate]):
    """The Replicate emulator on a real socket in a background thread; a context manager.

    Same options as :class:`FakeFalServer`. Point ``replicate.Client(base_url=server.url)``
    (or ``REPLICATE_BASE_URL`` / ``JOBS_REPLICATE_API_URL``) at ``url``; ``fake`` is the live
    :class:`jobs.testing.FakeReplicate` (``stats``, ``config``, ``advance``).
    """

    _label = "fake-replicate"

    def __init__(
        self,
        config: FakeReplicateConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl: bool | Any = False,
        *,
        log_level: str = "warning",
    ) -> None:
        super().__init__(FakeReplicate(config), host, port, ssl, log_level)

    @property
    def config(self) -> FakeReplicateConfig:
        return self.fake.config

    @property
    def stats(self) -> FakeReplicateStats:
        return self.fake.stats
