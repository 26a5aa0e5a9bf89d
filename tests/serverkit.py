"""`pitstop server` for tests: the real server in-process on 127.0.0.1 (ephemeral port) or as a subprocess,
devices registered on its store, the daemon's own DDI client pointed at it, and a TCP proxy that cuts a
download once so that a resume can be watched.

    with site(tmp_path) as s:                   # Server + Store, serving
        tok = s.add_device("dev-1", group="lab")
        c = s.client("dev-1", tok)              # pitstop.daemon.ddi.DdiClient
        dist = s.upload(bundle)                 # checked and stored, as `pitstop server upload` does
        s.deploy(dist, ["dev-1"])               # a rollout (RolloutSpec keywords)
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pitstop.daemon.ddi import DdiClient, GatewayToken, TargetToken
from pitstop.hil.site import SiteServer
from pitstop.ota.server import artifacts, auth, deployments, devices
from pitstop.ota.server.records import Distribution, Rollout
from pitstop.ota.server.serve import ServeOptions, Server
from pitstop.ota.server.store import Store, set_meta

TENANT = "DEFAULT"


@dataclass
class Site:
    server: Server
    keyring: Path | None

    @property
    def store(self) -> Store:
        return self.server.store

    @property
    def url(self) -> str:
        return self.server.url

    def add_device(self, device_id: str, *, group: str | None = None, token: str | None = None) -> str:
        token = token or auth.generate_token()
        self.store.write(lambda c, now: devices.add(c, now, device_id, group=group, token_hash=auth.hash_token(token)))
        return token

    def set_gateway_token(self, token: str | None) -> None:
        self.store.write(lambda c, _now: set_meta(c, devices.GATEWAY_META, auth.hash_token(token) if token else None))

    def client(self, device_id: str, token: str | None = None, *, gateway: str | None = None, **kw: Any) -> DdiClient:
        creds = GatewayToken(gateway) if gateway else TargetToken(token) if token else None
        return DdiClient(self.url, TENANT, device_id, auth=creds, **kw)

    def upload(self, bundle: Path, *, keyring: Path | None = None) -> Distribution:
        return artifacts.upload(self.store, bundle, keyring=keyring or self.keyring).distribution

    def deploy(self, dist: Distribution, device_ids: Sequence[str], **kw: Any) -> deployments.Created:
        spec = deployments.RolloutSpec(target=kw.pop("target", "test"), devices=list(device_ids), **kw)
        return self.store.write(lambda c, now: deployments.create_rollout(c, now, dist, spec))

    def rollout(self, rollout_id: int) -> Rollout:
        return self.store.read(lambda c: deployments.get_rollout(c, rollout_id))

    def action(self, action_id: int) -> Any:
        return self.store.read(lambda c: deployments.get_action(c, action_id))

    def device(self, device_id: str) -> Any:
        self.store.flush()
        return self.store.read(lambda c: devices.require(c, device_id))


@contextlib.contextmanager
def site(tmp: Path, *, keyring: Path | None = None, **opts: Any) -> Iterator[Site]:
    opts.setdefault("listen", "127.0.0.1:0")
    opts.setdefault("poll_interval", "30s")
    with Server(ServeOptions(data=tmp / "server-data", keyring=keyring, **opts)) as srv:
        yield Site(srv, keyring)


# -- the server as a process ----------------------------------------------------------------------------------


class ServerProcess:
    """`pitstop server serve` as a child process (pitstop.hil.site.SiteServer), started at once, with the server's
    default poll interval unless `args` sets one; `url` is where it listens."""

    def __init__(self, data: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.site = SiteServer(data, *args, verbose=False, poll_interval=None, env=env).start()
        assert self.site.proc is not None
        self.proc = self.site.proc
        self.url = self.site.url("127.0.0.1")
        self.kill, self.stop = self.site.kill, self.site.stop

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.site.stop()


# -- a proxy that cuts ------------------------------------------------------------------------------------------


class CuttingProxy:
    """TCP proxy to `target` (host, port) on 127.0.0.1: the first connection whose answer passes `cut_after`
    bytes is cut there (a mobile link dropping); every other connection is forwarded whole."""

    def __init__(self, target: tuple[str, int], cut_after: int) -> None:
        self.target = target
        self.cut_after = cut_after
        self.cuts = 0
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.target)

        def up() -> None:
            with contextlib.suppress(OSError):
                while data := client.recv(65536):
                    upstream.sendall(data)
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_WR)

        threading.Thread(target=up, daemon=True).start()
        sent = 0
        cut = self.cuts == 0
        try:
            while data := upstream.recv(65536):
                if cut and sent + len(data) > self.cut_after:
                    client.sendall(data[: self.cut_after - sent])
                    self.cuts += 1
                    time.sleep(0.05)
                    break
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)  # a FIN now, even while the other thread is in recv()
                with contextlib.suppress(OSError):
                    s.close()

    def __enter__(self) -> CuttingProxy:
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._stop = True
        self._sock.close()
