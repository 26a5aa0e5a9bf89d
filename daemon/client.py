"""A synchronous client of the daemon's D-Bus API (daemon/data/org.pitstop.Daemon1.xml), for `pitstop status`,
`install`, `mark-good` and `mark-bad`.

It speaks the D-Bus wire protocol itself, over a blocking Unix socket: just what a client needs (EXTERNAL
authentication, method calls whose arguments are strings, any reply or signal read back). Why not dbus-fast,
which the daemon serves with: importing it loads asyncio and xml.etree as well, about 25 ms on a command of
some 70 (`pitstop status` is a target for start-up time; docs/cli.md has the figures), and its low-level
Message API costs the same, since the package's `__init__` imports all of it. The calls themselves take about
3 ms either way. tests/test_daemon_client.py checks this reader and writer against dbus-fast's, and the whole
client against a real dbus-daemon serving the real daemon core.

Errors the daemon sends back become pitstop's typed errors: a refused caller `NotAuthorizedError` (56), a busy
daemon `BusyError` (57), any other `org.pitstop.Error.<Kind>` a `DaemonCallError` with the daemon's one-line
message and the exit code the same operation has locally (the code of the class `<Kind>Error`). An install
that fails ends with `Completed(false, message)`, which carries no kind: `InstallFailedError` (58).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

from pitstop.daemon.dbus_wire import (
    CONNECT_TIMEOUT_S,
    DBUS,
    DBUS_PATH,
    SIGNAL,
    Connection,
    Message,
    RemoteError,
    WireError,
    bus_address,
    bus_may_exist,
)
from pitstop.daemon.errors import BusyError, DaemonUnavailableError, InstallFailedError, NotAuthorizedError
from pitstop.errors import PitstopError

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

BUS_NAME = "org.pitstop.Daemon1"
PATH = "/org/pitstop/Daemon1"
INTERFACE = "org.pitstop.Daemon1"
ERROR_PREFIX = "org.pitstop.Error."

CALL_TIMEOUT_S = 120.0  # a method call (MarkGood writes the boot environment and state files)

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


class DaemonCallError(PitstopError):
    """The daemon refused or failed a call; `exit_code` is that of the same failure without the daemon."""

    def __init__(self, message: str, *, kind: str = "", exit_code: int = 1) -> None:
        super().__init__(message)
        self.kind = kind
        self.exit_code = exit_code


# -- what the daemon reports ----------------------------------------------------------------------------------


# NamedTuples rather than frozen dataclasses: a dataclass takes ~0.7 ms to create, and this module loads with
# every device command.
class SlotRow(NamedTuple):
    name: str
    booted: bool
    primary: bool
    bootable: bool
    pending_commit: bool
    tries_left: int
    version: str  # "" if unknown


class LoopRow(NamedTuple):
    name: str
    state: str
    fps: float
    p50_ms: float
    p99_ms: float
    restarts: int
    cause: str


class DaemonState(NamedTuple):
    """The API's properties (docs/dbus-api.md), as one reading."""

    version: str
    compatible: str
    booted: str  # "" if unknown
    primary: str
    phase: str
    slots: tuple[SlotRow, ...]
    update_state: str
    progress_done: int
    progress_total: int
    progress_stage: str
    update_error: str
    loops: tuple[LoopRow, ...]

    @classmethod
    def from_properties(cls, p: dict[str, Any]) -> DaemonState:
        done, total, stage = p.get("UpdateProgress", (0, 0, ""))
        return cls(
            version=str(p.get("Version", "")),
            compatible=str(p.get("Compatible", "")),
            booted=str(p.get("BootedSlot", "")),
            primary=str(p.get("PrimarySlot", "")),
            phase=str(p.get("Phase", "")),
            slots=tuple(
                SlotRow(str(n), bool(b), bool(pr), bool(ok), bool(pc), int(t), str(v))
                for n, b, pr, ok, pc, t, v in p.get("Slots", [])
            ),
            update_state=str(p.get("UpdateState", "")),
            progress_done=int(done),
            progress_total=int(total),
            progress_stage=str(stage),
            update_error=str(p.get("UpdateError", "")),
            loops=tuple(
                LoopRow(str(n), str(s), float(f), float(p50), float(p99), int(r), str(c))
                for n, s, f, p50, p99, r, c in p.get("Loops", [])
            ),
        )


# -- errors -------------------------------------------------------------------------------------------------


def _subclasses(cls: type[PitstopError]) -> Iterator[type[PitstopError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def error_for(name: str, message: str, member: str) -> PitstopError:
    """The typed error for a D-Bus error `name` with `message`, answered to a call of `member`."""
    if name in ("org.freedesktop.DBus.Error.AccessDenied", ERROR_PREFIX + "NotAuthorized"):
        if name.startswith(ERROR_PREFIX):
            return NotAuthorizedError(message)
        # The bus's own message names match rules and connection ids: say what it means instead.
        return NotAuthorizedError(f"{member} needs root or the pitstop group (refused by the bus policy)")
    if name == ERROR_PREFIX + "Busy":
        return BusyError(message)
    if name in ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner"):
        return DaemonUnavailableError(f"the pitstop daemon went away: {message}")
    if name in ("org.freedesktop.DBus.Error.NoReply", "org.freedesktop.DBus.Error.Timeout"):
        return DaemonUnavailableError(f"the pitstop daemon did not answer {member}: {message}")
    if name.startswith(ERROR_PREFIX):
        kind = name.removeprefix(ERROR_PREFIX)
        # The daemon names the error by its class (StateError -> State); the same class gives the exit code
        # the command has without the daemon. These modules define the errors the device commands raise.
        import pitstop.daemon.errors  # noqa: PLC0415
        import pitstop.ota.device  # noqa: F401, PLC0415

        code = next((c.exit_code for c in _subclasses(PitstopError) if c.__name__ == f"{kind}Error"), 1)
        return DaemonCallError(message, kind=kind, exit_code=code)
    return DaemonCallError(f"{member}: {name}: {message}")


# -- the client ---------------------------------------------------------------------------------------------


class DaemonClient:
    """A connection to the bus on which the daemon was found; a context manager. Use `connect()`."""

    def __init__(self, conn: Connection, address: str) -> None:
        self._conn = conn
        self.address = address

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    def state(self) -> DaemonState:
        """All properties (GetAll)."""
        (props,) = self._call("GetAll", "org.freedesktop.DBus.Properties", "s", INTERFACE)
        return DaemonState.from_properties(props)

    def mark_good(self) -> str:
        """MarkGood: returns the committed slot."""
        return str(self._call("MarkGood")[0])

    def mark_bad(self, slot: str | None) -> None:
        """MarkBad (None: the booted slot, or a pending model/files install)."""
        self._call("MarkBad", INTERFACE, "s", slot or "")

    def install(self, source: str, *, progress: ProgressFn | None = None) -> str:
        """Install `source` (a path as the daemon sees it, or a URL) and follow it to its end; returns the
        daemon's message. Raises InstallFailedError when it fails, BusyError when another install runs."""
        c = self._conn
        # Subscribe before Install, so that no signal of this install can be missed.
        self._call(
            "AddMatch",
            DBUS,
            "s",
            f"type='signal',sender='{BUS_NAME}',path='{PATH}',interface='{INTERFACE}'",
            dest=DBUS,
            path=DBUS_PATH,
            timeout=CONNECT_TIMEOUT_S,
        )
        self._call(
            "AddMatch",
            DBUS,
            "s",
            f"type='signal',sender='{DBUS}',interface='{DBUS}',member='NameOwnerChanged',arg0='{BUS_NAME}'",
            dest=DBUS,
            path=DBUS_PATH,
            timeout=CONNECT_TIMEOUT_S,
        )
        # Signals that come before the reply (wait_reply drops them) belong to an earlier job: Install returns
        # before its job's first signal, and a bus delivers one sender's messages in order.
        reply = self._wait("Install", c.send(BUS_NAME, PATH, INTERFACE, "Install", "s", source), CALL_TIMEOUT_S)
        daemon = reply.sender
        c.sock.settimeout(None)  # an install takes as long as it takes; the bus tells if the daemon goes away
        while True:
            try:
                msg = c.read()
            except (OSError, EOFError, WireError) as e:
                raise DaemonUnavailableError(f"the connection to the bus broke during the install: {e}") from None
            if msg.type != SIGNAL:
                continue
            if msg.member == "NameOwnerChanged" and msg.sender == DBUS:
                if msg.body[:2] == (BUS_NAME, daemon):
                    raise DaemonUnavailableError(
                        "the pitstop daemon stopped during the install (`pitstop status` shows where it is)"
                    )
                continue
            if msg.sender != daemon or msg.interface != INTERFACE or msg.path != PATH:
                continue
            if msg.member == "Progress" and msg.signature == "stt" and progress is not None:
                progress(*msg.body)
            elif msg.member == "StateChanged" and msg.signature == "ss":
                new, reason = msg.body
                log.info("daemon: update %s%s", new, f": {reason}" if reason else "")
                if new == "failed":
                    # The update agent can fail a flow before the install proper starts, and then sends no
                    # Completed; an install that fails sends Completed right after this, with this reason.
                    raise InstallFailedError(reason or "the install failed (see the daemon's journal)")
            elif msg.member == "Completed" and msg.signature == "bs":
                ok, message = msg.body
                if not ok:
                    raise InstallFailedError(message or "the install failed (see the daemon's journal)")
                return str(message)

    def _call(
        self,
        member: str,
        iface: str = INTERFACE,
        sig: str = "",
        *args: str,
        dest: str = BUS_NAME,
        path: str = PATH,
        timeout: float = CALL_TIMEOUT_S,
    ) -> tuple[Any, ...]:
        return self._wait(member, self._conn.send(dest, path, iface, member, sig, *args), timeout).body

    def _wait(self, member: str, serial: int, timeout: float) -> Message:
        self._conn.sock.settimeout(timeout)
        try:
            return self._conn.wait_reply(serial)
        except RemoteError as e:
            raise error_for(e.name, e.message, member) from None
        except TimeoutError:
            raise DaemonUnavailableError(f"the pitstop daemon did not answer {member} in {timeout:.0f} s") from None
        except (OSError, EOFError, WireError) as e:
            raise DaemonUnavailableError(f"the connection to the bus broke during {member}: {e}") from None


def connect(address: str | None = None) -> DaemonClient | None:
    """A client of the daemon on `address` (default: `bus_address()`), or None when the daemon is not there:
    no bus socket, a bus that cannot be reached, or no owner of org.pitstop.Daemon1 on it (the daemon is never
    started by activation). Why not is logged at INFO (`pitstop -v`)."""
    address = address or bus_address()
    if not bus_may_exist(address):
        log.info("no D-Bus socket at %s: acting without the daemon", address)
        return None
    try:
        conn = Connection.open(address)
    except (OSError, EOFError, WireError, RemoteError) as e:  # a bus that cannot be reached: no daemon
        log.info("cannot reach the D-Bus at %s (%s): acting without the daemon", address, e)
        return None
    try:
        (owned,) = conn.call(DBUS, DBUS_PATH, DBUS, "NameHasOwner", "s", BUS_NAME)
    except (OSError, EOFError, WireError, RemoteError) as e:
        conn.close()
        log.info("the D-Bus at %s did not answer NameHasOwner (%s): acting without the daemon", address, e)
        return None
    if not owned:
        conn.close()
        log.info("no %s on the D-Bus at %s: acting without the daemon", BUS_NAME, address)
        return None
    return DaemonClient(conn, address)
