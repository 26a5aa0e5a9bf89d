"""`pitstop server serve`: the store, the application and the HTTP(S) transport put together, and stopped
cleanly on SIGTERM or SIGINT (requests under way finish, poll times are written, the database is closed).

At start the server takes the data directory's serve lock (one server per directory; management commands
need no lock), checks the database (PRAGMA quick_check), clears what interrupted uploads left, and judges
every running rollout again (feedback or cancellations stored while it was down may finish a wave).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import resource
import signal
import sys
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

from pitstop.atomic import atomic_write
from pitstop.ota.server import artifacts, deployments
from pitstop.ota.server.app import App
from pitstop.ota.server.ddi_api import DdiSettings
from pitstop.ota.server.errors import ServerConfigError, ServerError
from pitstop.ota.server.http import HttpServer, parse_listen, tls_context
from pitstop.ota.server.store import Store

log = logging.getLogger(__name__)

LOCK_FILE = "serve.lock"
_TENANT = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DURATION = re.compile(r"(\d+)\s*(s|m|h)?")
_HHMMSS = re.compile(r"(\d{1,2}):([0-5]\d):([0-5]\d)")


def parse_interval(text: str) -> int:
    """'30', '30s', '5m', '1h' or '00:05:00' → seconds, 1 s up to below a day (hawkBit's HH:MM:SS)."""
    t = text.strip().lower()
    m = _HHMMSS.fullmatch(t)
    if m:
        seconds = int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])
    else:
        m = _DURATION.fullmatch(t)
        if m is None:
            raise ServerConfigError(f"--poll-interval {text!r}: expected seconds, 5m, 1h or HH:MM:SS")
        seconds = int(m[1]) * {"s": 1, "m": 60, "h": 3600, None: 1}[m[2]]
    if not 1 <= seconds < 86400:
        raise ServerConfigError(f"--poll-interval {text!r}: must be at least 1 s and less than a day")
    return seconds


@dataclass(frozen=True)
class ServeOptions:
    data: Path
    listen: str = "0.0.0.0:8080"  # a site server serves the site's network (hawkBit's port)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    tenant: str = "DEFAULT"
    poll_interval: str = "00:05:00"
    auto_register: bool = False
    public_url: str | None = None
    keyring: Path | None = None
    health_history: int = 240
    idle_timeout_s: float = 120.0
    max_connections: int = 4096


def _check(opts: ServeOptions) -> DdiSettings:
    if not _TENANT.fullmatch(opts.tenant):
        raise ServerConfigError(f"--tenant {opts.tenant!r}: 1-64 letters, digits, '.', '_', '-'")
    if (opts.tls_cert is None) != (opts.tls_key is None):
        raise ServerConfigError("TLS needs both --tls-cert and --tls-key")
    if opts.client_ca is not None and opts.tls_cert is None:
        raise ServerConfigError("--client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if opts.public_url is not None:
        p = urllib.parse.urlsplit(opts.public_url)
        if p.scheme not in ("http", "https") or not p.netloc or p.query or p.fragment:
            raise ServerConfigError(f"--public-url {opts.public_url!r}: expected http(s)://host[:port][/prefix]")
    if not 1 <= opts.health_history <= 100_000:
        raise ServerConfigError("--health-history: 1 to 100000 summaries per device")
    return DdiSettings(
        tenant=opts.tenant,
        poll_s=parse_interval(opts.poll_interval),
        auto_register=opts.auto_register,
        public_url=opts.public_url,
    )


def _raise_fd_limit(wanted: int) -> None:
    """One descriptor per connection: lift the soft limit towards the hard one (1024 is a common default)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class Server:
    """A running server on one data directory: `start()`, `url`, `stop()` (or use it as a context manager)."""

    def __init__(self, opts: ServeOptions) -> None:
        settings = _check(opts)
        host, port = parse_listen(opts.listen)
        tls = tls_context(opts.tls_cert, opts.tls_key, opts.client_ca) if opts.tls_cert and opts.tls_key else None
        self.opts = opts
        self._stopped = False
        self._lock_fd = self._take_lock(opts.data)
        try:
            self.store = Store(opts.data)
            try:
                self._prepare(opts)
                _raise_fd_limit(opts.max_connections + 256)
                self.app = App(self.store, settings, health_history=opts.health_history)
                self.http = HttpServer(
                    self.app,
                    host,
                    port,
                    tls=tls,
                    idle_timeout=opts.idle_timeout_s,
                    max_connections=opts.max_connections,
                )
            except BaseException:
                self.store.close()
                raise
        except BaseException:
            os.close(self._lock_fd)
            raise

    @staticmethod
    def _take_lock(data: Path) -> int:
        try:
            data.mkdir(parents=True, exist_ok=True)
            fd = os.open(data / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ServerConfigError(f"cannot use the data directory {data}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ServerError(f"another pitstop server serves {data} already") from None
        return fd

    def _prepare(self, opts: ServeOptions) -> None:
        self.store.quick_check()
        if opts.keyring is not None:
            from pitstop.ota.keyring import load_keyring  # noqa: PLC0415

            load_keyring(opts.keyring)  # refused now (exit 21) rather than at the first upload
            # Uploads run as their own commands on the data directory: they find the server's keyring there.
            atomic_write(self.store.keyring_path, opts.keyring.read_bytes())
        artifacts.sweep(self.store)
        for r in self.store.write(deployments.advance_all):
            if r.status.value != "running":
                log.info("rollout r%d is %s: %s", r.id, r.status.value, r.reason)

    @property
    def url(self) -> str:
        return self.http.url

    def start(self) -> None:
        self.store.start_writer()
        self.http.start()
        log.info("serving on %s (data %s)", self.url, self.opts.data)

    def stop(self, drain_s: float = 10.0) -> None:
        """Stop serving and close the store (once: a second call does nothing)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self.http.shutdown(drain_s)
        finally:
            self.store.close()
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def serve(opts: ServeOptions) -> int:
    """Run until SIGTERM or SIGINT; 0 after a clean stop."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("stopping on %s", signal.Signals(signum).name)
        stop.set()

    with Server(opts) as srv:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        tenant = urllib.parse.quote(opts.tenant, safe="")
        sys.stdout.write(
            f"pitstop server: listening on {srv.url} (DDI {srv.url}/{tenant}/controller/v1/<device>, "
            f"OTLP {srv.url}/v1/metrics)\n"
        )
        sys.stdout.flush()
        while not stop.wait(1.0):
            pass
    return 0
