"""A bundle read over HTTP(S) as a forward stream that survives dropped connections.

The reader asks for the next byte it needs with a Range request whenever a connection drops, so every
byte is downloaded about once and the installer never sees the interruption. Retries back off
exponentially and start over after progress; a server that ignores Range is read up to the position.

A delta install reads only parts of a bundle: `window(start, end)` makes the next reads come from
`start` and end at `end`, and each request asks for no more than that (`Range: bytes=start-(end-1)`),
so the server sends nothing that is not used. Consecutive windows reuse the open response when they
continue it.
"""

from __future__ import annotations

import http.client
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import requests
import urllib3.exceptions

from pitstop import crashpoint
from pitstop.errors import PitstopError

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_SSL_REASON = re.compile(r"'(?:\[SSL: \w+\] )?([^'(]+?) \(_ssl\.c")


class DownloadError(PitstopError):
    """The bundle could not be downloaded (server error, too many failed retries, TLS failure)."""

    exit_code = 26


@dataclass(frozen=True)
class HttpOptions:
    ca: Path | None = None               # CA bundle for TLS verification (None: requests' default bundle)
    client_cert: Path | None = None      # PEM with certificate (and key, unless client_key is given)
    client_key: Path | None = None
    headers: tuple[tuple[str, str], ...] = ()
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 8                     # consecutive failures without progress before giving up
    backoff: float = 0.5                 # first wait; doubles up to backoff_max
    backoff_max: float = 30.0
    rate_limit: int | None = None        # bytes per second


class HttpSource:
    """A forward-only, read()-able bundle at `url`."""

    def __init__(self, url: str, opts: HttpOptions | None = None, *, session: requests.Session | None = None) -> None:
        self.url = url
        self.opts = opts = opts or HttpOptions()
        self.session = session or requests.Session()
        self.session.headers.update(dict(opts.headers))
        # Passed with each request too: a session-wide `verify` loses to $REQUESTS_CA_BUNDLE/$CURL_CA_BUNDLE,
        # which would silently replace the configured CA.
        self._verify: str | bool = str(opts.ca) if opts.ca else True
        self.session.verify = self._verify
        if opts.client_cert:
            self.session.cert = (str(opts.client_cert), str(opts.client_key)) if opts.client_key else str(
                opts.client_cert)
        self.pos = 0
        self.size: int | None = None
        self.ranges: bool | None = None   # the server honours Range (None: not asked yet)
        self._end: int | None = None      # the window's end (exclusive); None: the end of the file
        self._resp_end: int | None = None  # where the open response's body ends; None: the end of the file
        self.bytes_received = 0   # everything that came over the wire, including what a restart re-read
        self.connections = 0
        self._resp: requests.Response | None = None
        self._raw: Any = None
        self._bucket_t = time.monotonic()
        self._bucket_bytes = 0

    # -- file protocol ----------------------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.pos

    @property
    def window_end(self) -> int | None:
        return self._end

    def window(self, start: int, end: int | None) -> None:
        """Read from `start` next, up to `end` (exclusive; None: the end of the file). Going backwards is
        allowed (a new request); with a server that ignores Range it means reading from the start again."""
        if end is not None and end < start:
            raise ValueError(f"window end {end} before its start {start}")
        if self._raw is not None and (start != self.pos or not self._covers(end)):
            self._close_response()
        self.pos = start
        self._end = end

    def _covers(self, end: int | None) -> bool:
        """The open response goes on at least to `end`."""
        if self._resp_end is None:
            return True
        return end is not None and end <= self._resp_end

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            raise ValueError("HttpSource.read needs a size")
        failures = 0
        while True:
            if self.size is not None and self.pos >= self.size:
                return b""
            if self._end is not None:
                if self.pos >= self._end:
                    return b""
                n = min(n, self._end - self.pos)
            if self._raw is not None and self._resp_end is not None and self.pos >= self._resp_end:
                self._close_response()  # a bounded response read to its end: the next request goes on
            try:
                if self._raw is None:
                    self._connect()
                crashpoint.hit("download")
                data: bytes = self._raw.read1(min(n, 1 << 20))
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, _Dropped) as e:
                self._close_response()
                failures += 1
                if isinstance(e, requests.exceptions.SSLError) or failures > self.opts.retries:
                    raise DownloadError(f"{self.url}: {describe_error(e)} (after {failures} attempt(s))") from None
                wait = min(self.opts.backoff * 2 ** (failures - 1), self.opts.backoff_max)
                log.warning(
                    "download interrupted at byte %d (%s); resuming in %.1f s", self.pos, describe_error(e), wait
                )
                time.sleep(wait)
                continue
            if not data:
                # EOF before the known end: the connection dropped cleanly mid-body.
                self._close_response()
                if self.size is None:
                    return b""
                failures += 1
                if failures > self.opts.retries:
                    raise DownloadError(f"{self.url}: connection keeps closing at byte {self.pos} of {self.size}")
                continue
            self.pos += len(data)
            self.bytes_received += len(data)
            self._throttle(len(data))
            return data

    def close(self) -> None:
        self._close_response()
        self.session.close()

    def __enter__(self) -> HttpSource:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------------

    def _connect(self) -> None:
        headers = {}
        if self._end is not None and self.ranges is not False:
            headers["Range"] = f"bytes={self.pos}-{self._end - 1}"
        elif self.pos:
            headers["Range"] = f"bytes={self.pos}-"
        self.connections += 1
        resp = self.session.get(self.url, headers=headers, stream=True, verify=self._verify,
                                timeout=(self.opts.connect_timeout, self.opts.read_timeout))
        if resp.status_code in _RETRYABLE_STATUS:
            resp.close()
            raise _Dropped(f"server answered {resp.status_code}")
        if resp.status_code == 416 and self.size is not None and self.pos >= self.size:
            resp.close()
            return
        if resp.status_code not in (200, 206):
            resp.close()
            raise DownloadError(f"{self.url}: server answered {resp.status_code} {resp.reason}")
        skip = 0
        if resp.status_code == 206:
            m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != self.pos:
                resp.close()
                raise DownloadError(f"{self.url}: server sent a range that does not start at byte {self.pos}")
            total = None if m.group(3) == "*" else int(m.group(3))
            self.ranges = True
            self._resp_end = int(m.group(2)) + 1
        else:
            if "Range" in headers:
                self.ranges = False
            self._resp_end = None
            skip = self.pos  # no Range support: read again from the start and discard
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if total is not None:
            if self.size is not None and total != self.size:
                resp.close()
                raise DownloadError(f"{self.url}: the file changed size during download ({self.size} → {total})")
            self.size = total
        self._resp, self._raw = resp, resp.raw
        while skip:
            got = self._raw.read(min(skip, 1 << 20))
            if not got:
                raise _Dropped("connection closed while skipping to the resume point")
            self.bytes_received += len(got)
            skip -= len(got)

    def _close_response(self) -> None:
        if self._resp is not None:
            self._resp.close()
        self._resp = self._raw = None
        self._resp_end = None

    def _throttle(self, n: int) -> None:
        rate = self.opts.rate_limit
        if not rate:
            return
        self._bucket_bytes += n
        ahead = self._bucket_bytes / rate - (time.monotonic() - self._bucket_t)
        if ahead > 0:
            time.sleep(ahead)
        if self._bucket_bytes > rate:  # keep the window short so a pause is not paid back in a burst
            self._bucket_t, self._bucket_bytes = time.monotonic(), 0


class _Dropped(Exception):
    pass


def describe_error(e: BaseException) -> str:
    """One readable line for a failed HTTP request or body read (TLS reason, timeout, connection broken)."""
    if isinstance(e, requests.exceptions.SSLError):
        # OpenSSL's reason tells an untrusted server from a refused client certificate.
        m = _SSL_REASON.search(str(e))
        return f"TLS failed: {m[1]}" if m else "TLS failed"
    if isinstance(e, requests.exceptions.ConnectTimeout | requests.exceptions.ReadTimeout):
        return "timed out"
    if isinstance(e, requests.exceptions.ConnectionError):
        return "connection failed"
    if isinstance(e, urllib3.exceptions.ProtocolError):  # raised by the body's reads, not wrapped by requests
        cause = e.args[1] if len(e.args) > 1 else None
        if isinstance(cause, OSError) and cause.strerror:
            return f"connection broken: {cause.strerror.lower()}"
        if isinstance(cause, urllib3.exceptions.IncompleteRead | http.client.IncompleteRead):
            return "connection closed before the end of the response"
        return "connection broken"
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))
