"""`pitstop status`, `install`, `mark-good` and `mark-bad` as clients of the daemon (daemon/client.py), run as
subprocesses against the real daemon core served on a private dbus-daemon (tests/dbuskit.py), with a file-backed
device (tests/devicekit.py) and real bundles; and their fallback to the device itself when no daemon runs."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pty
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bundlekit import CliResult, Keys, assert_refused, make_bundle, mixed_data, rootfs_payload
from dbuskit import PrivateBus, ServedDaemon
from devicekit import TestDevice, make_device

from pitstop.daemon import client
from pitstop.daemon import dbus_wire as wire
from pitstop.daemon.client import DaemonCallError
from pitstop.daemon.errors import InstallFailedError
from pitstop.ota.grubenv import decode

NOBODY = 65534
# The daemon's control group in these tests: the runner's own group, so that they also pass when not run as root
# (`nobody` is in neither group).
GROUP = grp.getgrgid(os.getgid()).gr_name
REPO = Path(__file__).resolve().parent.parent
POLICY = REPO / "daemon" / "data" / "org.pitstop.Daemon1.conf"


def cli(dev: TestDevice, bus: str | PrivateBus, *args: str, user: int | None = None, timeout: float = 60) -> CliResult:
    """`pitstop ARGS` in a subprocess, on `bus` (a PrivateBus or an address), as `user` (a uid) if given."""
    env = {
        **os.environ,
        "PITSTOP_CONFIG": str(dev.config_path),
        "PITSTOP_BUS_ADDRESS": bus.address if isinstance(bus, PrivateBus) else bus,
    }
    p = subprocess.run(
        [sys.executable, "-m", "pitstop.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=timeout,
        user=user,
        group=user,
        extra_groups=[] if user is not None else None,
        check=False,
    )
    return CliResult(p.returncode, p.stdout, p.stderr)


def status(dev: TestDevice, bus: str | PrivateBus, *extra: str, user: int | None = None) -> dict[str, Any]:
    r = cli(dev, bus, "status", "--json", *extra, user=user)
    assert r.rc == 0, r.err
    doc: dict[str, Any] = json.loads(r.out)
    return doc


@pytest.fixture
def dev(tmp_path: Path, keys: Keys) -> TestDevice:
    return make_device(tmp_path / "dev", keys)


@pytest.fixture
def bus() -> Iterator[PrivateBus]:
    with PrivateBus() as b:
        yield b


@pytest.fixture
def daemon(bus: PrivateBus, dev: TestDevice) -> Iterator[ServedDaemon]:
    with ServedDaemon(bus, dev.config_path, control_group=GROUP) as d:
        yield d


@pytest.fixture
def bundle(tmp_path: Path, keys: Keys) -> tuple[Path, bytes]:
    data = mixed_data(3 << 20, seed=7)
    path = make_bundle(tmp_path / "u.pitb", [rootfs_payload(tmp_path / "rootfs.img", data)], keys, version="2.0.0")
    return path, data


# -- status --------------------------------------------------------------------------------------------------


def test_status_through_the_daemon_agrees_with_local(dev: TestDevice, bus: PrivateBus, daemon: ServedDaemon) -> None:
    doc = status(dev, bus)
    extra = doc.pop("daemon")
    assert doc == status(dev, bus, "--local")
    assert extra == {
        "version": extra["version"],
        "state_files_read": True,
        "update_state": "idle",
        "update_progress": {"stage": "", "done": 0, "total": 0},
        "update_error": "",
        "loops": [],
    }
    text = cli(dev, bus, "status").out.splitlines()
    local = cli(dev, bus, "status", "--local").out.splitlines()
    assert text[: len(local)] == local
    assert text[len(local) :] == [f"daemon: pitstop {extra['version']}, update idle"]


def test_config_means_local(dev: TestDevice, bus: PrivateBus, daemon: ServedDaemon) -> None:
    """--config names a device description: the command acts on that device itself, not through the daemon."""
    assert "daemon" not in status(dev, bus, "--config", str(dev.config_path))


# -- install -------------------------------------------------------------------------------------------------


def test_install_through_the_daemon(
    dev: TestDevice, bus: PrivateBus, daemon: ServedDaemon, bundle: tuple[Path, bytes]
) -> None:
    path, data = bundle
    r = cli(dev, bus, "install", str(path))
    assert r.rc == 0, r.err
    assert r.out.startswith("installed version 2.0.0"), r.out
    # Off a terminal the bar is log lines; the daemon's Progress signals drove it to the end.
    assert "installing: done, 3.0 MiB" in r.err, r.err
    assert daemon.core.state.value == "installed"  # the daemon did it
    assert dev.slot("b").read_bytes()[: len(data)] == data
    assert decode(dev.grubenv.read_bytes())["ORDER"].split()[0] == "b"
    doc = status(dev, bus)
    extra = doc.pop("daemon")
    assert extra["update_state"] == "installed"
    assert extra["update_progress"] == {"stage": "write", "done": len(data), "total": len(data)}
    assert doc == status(dev, bus, "--local")
    assert (doc["phase"], doc["primary"], doc["pending"]) == ("activated", "b", "b")


def test_install_goes_through_the_update_agent(dev: TestDevice, bus: PrivateBus, bundle: tuple[Path, bytes]) -> None:
    """With the update agent in the daemon (as `pitstop daemon` runs it), an install from the command line gets the
    daemon's update flow: here its reboot policy, `immediate`."""
    from pitstop.daemon.config import UpdateConfig

    reboots: list[str] = []
    state_dir = dev.data / "pitstop" / "daemon"
    agent = UpdateConfig(reboot="immediate")
    with ServedDaemon(bus, dev.config_path, control_group=GROUP, update=agent, state_dir=state_dir,
                      reboot=lambda: reboots.append("reboot")) as d:  # fmt: skip
        r = cli(dev, bus, "-q", "install", str(bundle[0]))
        assert r.rc == 0, r.err
        assert r.out.startswith("installed version 2.0.0"), r.out
        deadline = time.monotonic() + 20
        while not reboots and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reboots == ["reboot"]
        assert d.agent.record is not None and d.agent.record.version == "2.0.0"
    assert decode(dev.grubenv.read_bytes())["ORDER"].split()[0] == "b"


def test_install_shows_a_bar_on_a_terminal(
    dev: TestDevice, bus: PrivateBus, daemon: ServedDaemon, bundle: tuple[Path, bytes]
) -> None:
    master, slave = pty.openpty()
    env = {**os.environ, "PITSTOP_CONFIG": str(dev.config_path), "PITSTOP_BUS_ADDRESS": bus.address}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pitstop.cli", "install", str(bundle[0])],
        stdout=subprocess.PIPE,
        stderr=slave,
        env=env,
        text=True,
    )
    os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "installing [##############################] 100.0% 3.0 MiB/3.0 MiB" in err.decode(), err
    assert out.startswith("installed version 2.0.0")


def test_bad_bundle_through_the_daemon(
    dev: TestDevice, bus: PrivateBus, daemon: ServedDaemon, tmp_path: Path, keys: Keys
) -> None:
    path = make_bundle(tmp_path / "bad.pitb", [rootfs_payload(tmp_path / "r.img", b"x" * 100_000)], keys)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # a flipped byte in the last chunk
    path.write_bytes(bytes(raw))
    before = dev.snapshot()
    r = cli(dev, bus, "install", str(path))
    assert_refused(r, InstallFailedError.exit_code)
    assert "does not match the signed manifest" in r.err
    assert dev.snapshot() == before
    doc = status(dev, bus)
    assert doc["daemon"]["update_state"] == "failed"
    assert doc["daemon"]["update_error"] in r.err
    assert "daemon: pitstop" in (line := cli(dev, bus, "status").out.splitlines()[-1]) and "update failed: " in line
    # Locally the same bundle gives its specific code (17: a payload does not match its hashes).
    assert cli(dev, bus, "install", "--local", str(path)).rc == 17


def test_install_from_a_directory_the_daemon_cannot_see(dev: TestDevice, bus: PrivateBus, daemon: ServedDaemon) -> None:
    r = cli(dev, bus, "install", "/tmp/pitstop-no-such-bundle.pitb")
    assert_refused(r, InstallFailedError.exit_code)
    assert "cannot open bundle /tmp/pitstop-no-such-bundle.pitb" in r.err and "sandbox hides /tmp" in r.err


def test_relative_source_is_made_absolute(
    dev: TestDevice, bus: PrivateBus, daemon: ServedDaemon, bundle: tuple[Path, bytes]
) -> None:
    env = {**os.environ, "PITSTOP_CONFIG": str(dev.config_path), "PITSTOP_BUS_ADDRESS": bus.address}
    p = subprocess.run(
        [sys.executable, "-m", "pitstop.cli", "-q", "install", bundle[0].name],
        cwd=bundle[0].parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # -q: no progress


def test_local_only_install_options_are_refused_through_the_daemon(
    dev: TestDevice, bus: PrivateBus, daemon: ServedDaemon, bundle: tuple[Path, bytes]
) -> None:
    r = cli(dev, bus, "install", "--no-activate", "--retries", "3", str(bundle[0]))
    assert_refused(r, 2)
    assert "--no-activate, --retries: not possible through the pitstop daemon" in r.err
    assert daemon.core.state.value == "idle"


def test_second_install_is_refused_while_the_daemon_installs(dev: TestDevice, bus: PrivateBus) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow_install(source: str, progress: Any, *_: Any) -> str:
        entered.set()
        release.wait(30)
        return "9.9.9"

    with ServedDaemon(bus, dev.config_path, control_group=GROUP, installer=slow_install):
        env = {**os.environ, "PITSTOP_CONFIG": str(dev.config_path), "PITSTOP_BUS_ADDRESS": bus.address}
        first = subprocess.Popen(
            [sys.executable, "-m", "pitstop.cli", "-q", "install", "/data/first.pitb"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert entered.wait(30)
            r = cli(dev, bus, "install", "/data/second.pitb")
            assert_refused(r, 57)
            assert "already running" in r.err
        finally:
            release.set()
        out, err = first.communicate(timeout=60)
        assert first.returncode == 0, err
        assert out.startswith("installed version 9.9.9")


def test_daemon_stopping_during_an_install_ends_the_command(dev: TestDevice, bus: PrivateBus) -> None:
    """The client follows the daemon's bus name: when the daemon goes away mid-install, one line and 56."""
    entered, release = threading.Event(), threading.Event()

    def slow_install(source: str, progress: Any, *_: Any) -> str:
        progress("write", 1, 2)
        entered.set()
        release.wait(60)
        return "9.9.9"

    served = ServedDaemon(bus, dev.config_path, control_group=GROUP, installer=slow_install).__enter__()
    env = {**os.environ, "PITSTOP_CONFIG": str(dev.config_path), "PITSTOP_BUS_ADDRESS": bus.address}
    cmd = subprocess.Popen([sys.executable, "-m", "pitstop.cli", "install", "/data/x.pitb"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    stopper = threading.Thread(target=served.__exit__, args=(None, None, None))
    try:
        assert entered.wait(30)
        stopper.start()  # the core waits 5 s for the running install, then leaves the bus
        _, err = cmd.communicate(timeout=60)
    finally:
        release.set()
        if stopper.ident is not None:
            stopper.join(60)
    assert cmd.returncode == 56 and "Traceback" not in err, err
    # The progress so far (off a terminal: a log line), then the error.
    assert err.splitlines()[-1].startswith("pitstop: error: the pitstop daemon stopped during the install"), err


# -- mark-good, mark-bad -------------------------------------------------------------------------------------


def test_mark_good_and_mark_bad_through_the_daemon(dev: TestDevice, bus: PrivateBus, daemon: ServedDaemon) -> None:
    r = cli(dev, bus, "mark-good")
    assert (r.rc, r.out) == (0, "slot a marked good; committed security_version 0\n"), r.err
    r = cli(dev, bus, "mark-bad", "b")
    assert (r.rc, r.out) == (0, "marked bad; next boot: slot a\n"), r.err
    env = decode(dev.grubenv.read_bytes())
    assert env["a_OK"] == "1" and env["b_OK"] == "0"
    assert [s["bootable"] for s in status(dev, bus)["slots"]] == [True, False]  # the daemon's Slots


def test_daemon_errors_keep_the_local_exit_code(dev: TestDevice, bus: PrivateBus, daemon: ServedDaemon) -> None:
    through = cli(dev, bus, "mark-bad", "c")
    local = cli(dev, bus, "mark-bad", "c", "--local")
    assert_refused(through, 24)  # StateError
    assert through.err == local.err == "pitstop: error: no slot named 'c'\n"


# -- who may call --------------------------------------------------------------------------------------------


@pytest.mark.root
def test_unprivileged_caller_is_refused_by_the_daemon(
    dev: TestDevice, bus: PrivateBus, daemon: ServedDaemon, bundle: tuple[Path, bytes]
) -> None:
    before = dev.snapshot()
    for args in (("install", str(bundle[0])), ("mark-good",), ("mark-bad", "b")):
        r = cli(dev, bus, *args, user=NOBODY)
        assert_refused(r, 56)
        assert "needs root or the daemon's control group (uid 65534 is neither)" in r.err, r.err
    assert dev.snapshot() == before
    assert daemon.core.state.value == "idle"


@pytest.mark.root
def test_unprivileged_status_shows_what_the_daemon_says(dev: TestDevice, bus: PrivateBus, daemon: ServedDaemon) -> None:
    """`nobody` cannot read the device's files (under root's 0700 temporary directory here, root's 0640 files on
    a device): the daemon's properties are shown, the rest is null / '?'."""
    doc = status(dev, bus, user=NOBODY)
    full = status(dev, bus)
    assert doc["daemon"]["state_files_read"] is False
    assert (doc["booted"], doc["primary"], doc["phase"], doc["pending"]) == ("a", "a", "none", None)
    assert doc["next_boot"] is None and doc["committed_security_version"] is None and doc["payloads"] is None
    for mine, theirs in zip(doc["slots"], full["slots"], strict=True):
        for key in ("name", "booted", "primary", "bootable", "pending_commit", "tries_left"):
            assert mine[key] == theirs[key], key
        assert mine["content"] is None
    text = cli(dev, bus, "status", user=NOBODY).out
    assert "next boot: ?" in text and "slot a: ?" in text and "not readable by this user" in text


@pytest.mark.root
def test_bus_policy_refusal_is_not_authorized(dev: TestDevice) -> None:
    with PrivateBus("system", include=POLICY) as bus, ServedDaemon(bus, dev.config_path):
        r = cli(dev, bus, "mark-good", user=NOBODY)
        assert_refused(r, 56)
        assert "MarkGood needs root or the pitstop group (refused by the bus policy)" in r.err
        assert status(dev, bus, user=NOBODY)["booted"] == "a"  # reading stays open
        assert cli(dev, bus, "mark-good").rc == 0  # root


# -- no daemon -----------------------------------------------------------------------------------------------


def test_no_daemon_on_the_bus_means_local(dev: TestDevice, bus: PrivateBus) -> None:
    doc = status(dev, bus)
    assert "daemon" not in doc and doc == status(dev, bus, "--local")
    r = cli(dev, bus, "mark-good")
    assert (r.rc, r.out) == (0, "slot a marked good; committed security_version 0\n"), r.err


def test_no_bus_means_local_without_loading_dbus(dev: TestDevice, tmp_path: Path) -> None:
    address = f"unix:path={tmp_path / 'no-bus'}"
    assert "daemon" not in status(dev, address)
    code = "import sys; from pitstop.cli import main; main(['status']); assert 'dbus_fast' not in sys.modules"
    env = {**os.environ, "PITSTOP_CONFIG": str(dev.config_path), "PITSTOP_BUS_ADDRESS": address}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    assert "phase: none" in p.stdout


# -- the client alone ----------------------------------------------------------------------------------------


def test_bus_may_exist(tmp_path: Path) -> None:
    assert not wire.bus_may_exist(f"unix:path={tmp_path}/none")
    assert not wire.bus_may_exist(f"unix:path={tmp_path}/a;unix:path={tmp_path}/b")
    assert wire.bus_may_exist("unix:abstract=/tmp/dbus-x")  # cannot be checked without connecting
    assert not wire.bus_may_exist("tcp:host=localhost,port=1")  # not a transport this client uses
    (tmp_path / "file").write_text("")
    assert not wire.bus_may_exist(f"unix:path={tmp_path}/file")  # not a socket


def test_unreachable_bus_is_no_daemon(tmp_path: Path) -> None:
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "stale"))  # a socket file nobody listens on
    s.close()
    assert wire.bus_may_exist(f"unix:path={tmp_path}/stale")
    assert client.connect(f"unix:path={tmp_path}/stale") is None


# Every type the API's properties and signals use, and the rest of the type system.
WIRE_CASES: list[tuple[str, list[Any]]] = [
    ("", []),
    ("s", ["héllo"]),
    ("ybnqiuxtd", [255, True, -2, 65535, -7, 1 << 31, -(1 << 40), (1 << 64) - 1, 2.5]),
    ("sog", ["a", "/org/pitstop/Daemon1", "a(sbbbbus)"]),
    ("a(sbbbbus)", [[["a", True, True, True, False, 3, ""], ["b", False, False, False, True, 0, "2.0.0"]]]),
    ("a(ssdddus)", [[["det", "running", 29.9, 12.5, 20.25, 1, "exit 1"]]]),
    ("a{sd}", [{"gpu.util": 0.5, "cpu": 1.0}]),
    ("(tts)", [[1, 2, "write"]]),
    (
        "a{sv}",
        [
            {
                "Version": ("s", "0.1.0"),
                "UpdateProgress": ("(tts)", [3, 4, "check"]),
                "Slots": ("a(sbbbbus)", []),
                "Health": ("a{sd}", {"x": 1.5}),
                "Deep": ("v", ("v", ("ay", b"ab"))),
            }
        ],
    ),
    ("bs", [False, "does not match"]),
    ("aas", [[["x"], [], ["y", "z"]]]),
    ("a{ya(yy)}", [{1: [[2, 3]], 4: []}]),
    ("ai", [[]]),
    ("ax", [[1, 2]]),  # 8-aligned elements after the length
]


def _plain(v: Any) -> Any:
    """dbus-fast's values (Variant, lists for structs, bytes for ay) as this client returns them."""
    from dbus_fast import Variant

    if isinstance(v, Variant):
        return _plain(v.value)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, bytes):
        return list(v)
    return v


def _variants(sig: str, body: list[Any]) -> list[Any]:
    from dbus_fast import Variant

    def conv(v: Any) -> Any:
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
            return Variant(v[0], conv(v[1]))
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v

    return [conv(v) for v in body]


def _fast_signal(sig: str, body: list[Any], serial: int = 1) -> bytes:
    """Signal M of interface i.f at /p, as dbus-fast marshals it."""
    from dbus_fast import Message as FastMessage
    from dbus_fast import MessageType

    m = FastMessage(path="/p", interface="i.f", member="M", signature=sig, body=_variants(sig, body),
                    message_type=MessageType.SIGNAL, serial=serial)  # fmt: skip
    return bytes(m._marshall(False))


@pytest.mark.parametrize(("sig", "body"), WIRE_CASES)
def test_wire_reader_agrees_with_dbus_fast(sig: str, body: list[Any]) -> None:
    msg = wire.unmarshal(_fast_signal(sig, body, serial=7))
    assert (msg.type, msg.serial, msg.path, msg.interface, msg.member, msg.signature) == (
        wire.SIGNAL,
        7,
        "/p",
        "i.f",
        "M",
        sig,
    )
    assert _plain(list(msg.body)) == _plain(_variants(sig, body))


def test_wire_writer_agrees_with_dbus_fast() -> None:
    import io

    from dbus_fast._private.unmarshaller import Unmarshaller

    out = wire.Message(
        wire.METHOD_CALL,
        42,
        ("a", "ünïcode"),
        "ss",
        "/org/pitstop/Daemon1",
        "org.pitstop.Daemon1",
        "Install",
        destination="org.pitstop.Daemon1",
        flags=wire.NO_AUTO_START,
    )
    data = wire.marshal(out)
    assert wire.message_length(data[:16]) == len(data)
    fast = Unmarshaller(io.BytesIO(data)).unmarshall()  # type: ignore[arg-type]
    assert fast is not None
    assert (fast.serial, fast.path, fast.interface, fast.member, fast.destination, fast.signature, fast.body) == (
        42,
        "/org/pitstop/Daemon1",
        "org.pitstop.Daemon1",
        "Install",
        "org.pitstop.Daemon1",
        "ss",
        ["a", "ünïcode"],
    )
    assert fast.flags.value == wire.NO_AUTO_START and wire.unmarshal(data) == out
    with pytest.raises(ValueError, match="string arguments only"):
        wire.marshal(wire.Message(wire.METHOD_CALL, 1, (3,), "i"))


def test_wire_reader_refuses_malformed_messages() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    fast = _fast_signal

    good = fast("a{sv}s", [{"k": ("as", ["x"]), "n": ("(tts)", [1, 2, "z"])}, "end"])
    wire.unmarshal(good)
    for cut in range(len(good)):
        with pytest.raises(wire.WireError):
            wire.unmarshal(good[:cut])

    @settings(max_examples=300, deadline=None)
    @given(st.integers(0, len(good) - 1), st.integers(0, 255))
    def flipped(i: int, b: int) -> None:
        data = bytearray(good)
        data[i] = b
        with contextlib.suppress(wire.WireError):  # a message, or WireError: nothing else escapes
            wire.unmarshal(bytes(data))

    flipped()
    # Variants nested 200 deep: refused, not a RecursionError.
    one = fast("v", [("y", 5)])
    body = b"\x01v\x00" * 200 + one[-4:]
    deep = bytearray(one[:-4] + body)
    deep[4:8] = len(body).to_bytes(4, "little")
    with pytest.raises(wire.WireError, match="nested too deeply"):
        wire.unmarshal(bytes(deep))
    for bad in ("a{sv", "()", "a", "(s", "z", "a{s}", "{sv}", "a{vs}", "a{sss}"):
        with pytest.raises(wire.WireError):
            wire.split_signature(bad)
    assert wire.split_signature("sa{sv}(ii)aas") == ["s", "a{sv}", "(ii)", "aas"]


@pytest.mark.parametrize(
    ("name", "cls_name", "code"),
    [
        ("org.freedesktop.DBus.Error.AccessDenied", "NotAuthorizedError", 56),
        ("org.pitstop.Error.NotAuthorized", "NotAuthorizedError", 56),
        ("org.pitstop.Error.Busy", "BusyError", 57),
        ("org.pitstop.Error.State", "DaemonCallError", 24),
        ("org.pitstop.Error.BootEnv", "DaemonCallError", 22),
        ("org.pitstop.Error.UnknownLoop", "DaemonCallError", 55),
        ("org.pitstop.Error.DaemonConfig", "DaemonCallError", 50),
        ("org.pitstop.Error.Internal", "DaemonCallError", 1),
        ("org.freedesktop.DBus.Error.ServiceUnknown", "DaemonUnavailableError", 56),
        ("org.freedesktop.DBus.Error.InvalidArgs", "DaemonCallError", 1),
    ],
)
def test_error_mapping(name: str, cls_name: str, code: int) -> None:
    e = client.error_for(name, "why", "MarkGood")
    assert (type(e).__name__, e.exit_code) == (cls_name, code)
    if isinstance(e, DaemonCallError) and name.startswith("org.pitstop."):
        assert e.message == "why"


def test_status_text_with_loops_and_progress(capsys: Any) -> None:
    """What a daemon with loops shows mid-install, to a user who cannot read the state files."""
    from pitstop.daemon.device_cli import _print_status, status_json

    st = client.DaemonState(
        version="0.1.0", compatible="x", booted="a", primary="a", phase="none",
        slots=(client.SlotRow("a", True, True, True, False, 3, "1.0.0"),
               client.SlotRow("b", False, False, False, False, 0, "")),
        update_state="installing", progress_done=3 << 20, progress_total=12 << 20, progress_stage="write",
        update_error="",
        loops=(client.LoopRow("detector", "running", 29.94, 12.5, 20.31, 0, ""),
               client.LoopRow("ocr", "backoff", 0.0, 0.0, 0.0, 3, "exit status 1")),
    )  # fmt: skip
    doc = status_json(st, None)
    assert doc["slots"][0]["bundle"] == {"version": "1.0.0"} and doc["slots"][1]["bundle"] == {}
    assert doc["daemon"]["loops"][1] == {"name": "ocr", "state": "backoff", "fps": 0.0, "p50_ms": 0.0, "p99_ms": 0.0,
                                         "restarts": 3, "cause": "exit status 1"}  # fmt: skip
    _print_status(doc, as_json=False)
    assert capsys.readouterr().out.splitlines() == [
        "booted: a   next boot: ?   phase: none",
        "committed security_version: ?",
        "  slot a: ?         version 1.0.0        tries 3  bootable  booted primary",
        "  slot b: ?         version -            tries 0  not bootable",
        "  (content, next boot, security version and model/files versions: the state files are not readable by "
        "this user)",
        "daemon: pitstop 0.1.0, update installing: write 25% (3.0 MiB of 12.0 MiB)",
        "  loop detector         running       29.9 fps  p50    12.5 ms  p99    20.3 ms  restarts 0",
        "  loop ocr              backoff        0.0 fps  p50     0.0 ms  p99     0.0 ms  restarts 3  exit status 1",
    ]
