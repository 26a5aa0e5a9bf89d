"""The daemon's D-Bus API on a private dbus-daemon: every method and property, signals during an install,
the privileged methods refused to an unprivileged caller (by the daemon itself, and by the bus policy)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from bundlekit import Keys, make_bundle, mixed_data, rootfs_payload
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus, ProxyInterface
from dbuskit import PrivateBus
from devicekit import TestDevice, make_device

from pitstop.daemon import dbus_api
from pitstop.daemon.core import DaemonCore, ProgressFn
from pitstop.daemon.dbus_api import BUS_NAME, INTERFACE, PATH
from pitstop.ota.grubenv import decode

T = TypeVar("T")
NOBODY = 65534
root_only = pytest.mark.root


def run(coro: Awaitable[T], timeout: float = 60) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


@dataclass
class Client:
    bus: MessageBus
    iface: ProxyInterface
    signals: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    changed: list[dict[str, Any]] = field(default_factory=list)

    async def call(self, member: str, signature: str = "", *body: Any) -> Message:
        return await self.bus.call(
            Message(destination=BUS_NAME, path=PATH, interface=INTERFACE, member=member, signature=signature,
                    body=list(body))
        )  # fmt: skip

    async def wait_signal(self, name: str, timeout: float = 30) -> tuple[Any, ...]:
        async def poll() -> tuple[Any, ...]:
            while True:
                for n, args in self.signals:
                    if n == name:
                        return args
                await asyncio.sleep(0.02)

        return await asyncio.wait_for(poll(), timeout)


@asynccontextmanager
async def daemon(bus: PrivateBus, dev: TestDevice, **core_kw: Any) -> AsyncIterator[tuple[DaemonCore, Client]]:
    group = core_kw.pop("control_group", "pitstop")
    sbus = await MessageBus(bus_address=bus.address).connect()
    core = DaemonCore(dev.config(), **core_kw)
    obj, _ = dbus_api.serve(sbus, core, control_group=group)
    await sbus.request_name(BUS_NAME)
    cbus = await MessageBus(bus_address=bus.address).connect()
    node = await cbus.introspect(BUS_NAME, PATH)
    iface = cbus.get_proxy_object(BUS_NAME, PATH, node).get_interface(INTERFACE)
    client = Client(cbus, iface)
    for sig in ("Progress", "StateChanged", "Completed", "LoopStateChanged"):
        getattr(iface, f"on_{_snake(sig)}")(lambda *a, _s=sig: client.signals.append((_s, a)))
    props = cbus.get_proxy_object(BUS_NAME, PATH, node).get_interface("org.freedesktop.DBus.Properties")
    props.on_properties_changed(
        lambda _i, changed, _inv: client.changed.append({k: v.value for k, v in changed.items()})
    )  # type: ignore[attr-defined]
    try:
        yield core, client
    finally:
        cbus.disconnect()
        await core.close()
        obj.unexport()
        sbus.disconnect()


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


@pytest.fixture
def dev(tmp_path: Path, keys: Keys) -> TestDevice:
    return make_device(tmp_path / "dev", keys)


@pytest.fixture
def bus() -> Any:
    with PrivateBus() as b:
        yield b


def test_properties_describe_the_device(bus: PrivateBus, dev: TestDevice) -> None:
    async def main() -> None:
        async with daemon(bus, dev) as (_core, c):
            i: Any = c.iface
            assert await i.get_booted_slot() == "a" and await i.get_primary_slot() == "a"
            assert await i.get_compatible() == "pitstop-test"
            assert await i.get_phase() == "none"
            assert await i.get_update_state() == "idle"
            assert tuple(await i.get_update_progress()) == (0, 0, "")
            assert await i.get_update_error() == ""
            slots = await i.get_slots()
            assert [s[0] for s in slots] == ["a", "b"]
            assert tuple(slots[0][1:4]) == (True, True, True)  # a: booted, primary, bootable
            assert slots[1][1] is False and slots[1][2] is False
            from pitstop import __version__

            assert await i.get_version() == __version__
            assert await i.get_health() == {} and await i.get_loops() == []
            # GetAll has exactly the contract's properties.
            props = "org.freedesktop.DBus.Properties"
            msg = Message(destination=BUS_NAME, path=PATH, interface=props, member="GetAll", signature="s",
                          body=[INTERFACE])  # fmt: skip
            reply = await c.bus.call(msg)
            assert reply.message_type is MessageType.METHOD_RETURN
            contract = dbus_api.contract()
            assert set(reply.body[0]) == {p for p in _names(contract, "property")}

    run(main())


def _names(xml: str, tag: str) -> list[str]:
    import re

    return re.findall(rf'<{tag} name="(\w+)"', xml)


def test_introspection_is_the_contract(bus: PrivateBus, dev: TestDevice) -> None:
    async def main() -> None:
        async with daemon(bus, dev) as (_core, c):
            node = await c.bus.introspect(BUS_NAME, PATH)
            iface = next(i for i in node.interfaces if i.name == INTERFACE)
            contract = dbus_api.contract()
            assert sorted(m.name for m in iface.methods) == sorted(_names(contract, "method"))
            assert sorted(s.name for s in iface.signals) == sorted(_names(contract, "signal"))
            assert {i.name for i in node.interfaces} >= {"org.freedesktop.DBus.Properties", INTERFACE}

    run(main())


@root_only
def test_install_over_dbus_emits_progress_and_switches_slots(
    bus: PrivateBus, dev: TestDevice, keys: Keys, tmp_path: Path
) -> None:
    data = mixed_data(3 << 20, seed=5)
    bundle = make_bundle(tmp_path / "u.pitb", [rootfs_payload(tmp_path / "rootfs.img", data)], keys,
                         version="2.0.0")  # fmt: skip

    async def main() -> None:
        async with daemon(bus, dev) as (_core, c):
            i: Any = c.iface
            await i.call_install(str(bundle))
            done = await c.wait_signal("Completed")
            assert done == (True, "installed version 2.0.0: it runs after the next reboot")
            progress = [a for n, a in c.signals if n == "Progress"]
            assert progress and progress[-1][1] == progress[-1][2] == len(data)
            states = [a[0] for n, a in c.signals if n == "StateChanged"]
            assert states == ["installing", "installed"]
            assert await i.get_update_state() == "installed"
            assert await i.get_primary_slot() == "b" and await i.get_phase() == "activated"
            await asyncio.sleep(0.2)  # PropertiesChanged follows the signals on the same connection
            assert any(ch.get("PrimarySlot") == "b" for ch in c.changed), c.changed

    run(main())
    assert dev.slot("b").read_bytes()[: len(data)] == data
    assert decode(dev.grubenv.read_bytes())["ORDER"].split()[0] == "b"


def test_bad_bundle_over_dbus_fails_and_changes_nothing(
    bus: PrivateBus, dev: TestDevice, keys: Keys, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path / "u.pitb", [rootfs_payload(tmp_path / "r.img", b"x" * 100_000)], keys)
    raw = bytearray(bundle.read_bytes())
    raw[-10] ^= 0xFF  # a flipped byte in the last chunk
    bundle.write_bytes(bytes(raw))
    before = dev.snapshot()

    async def main() -> None:
        async with daemon(bus, dev) as (_core, c):
            i: Any = c.iface
            await i.call_install(str(bundle))
            ok, message = await c.wait_signal("Completed")
            assert not ok and "does not match the signed manifest" in message, message
            assert await i.get_update_state() == "failed"
            assert await i.get_update_error() == message
            assert await i.get_primary_slot() == "a"

    run(main())
    after = dev.snapshot()
    assert after == before


def test_mark_good_and_mark_bad(bus: PrivateBus, dev: TestDevice) -> None:
    async def main() -> None:
        async with daemon(bus, dev) as (_core, c):
            i: Any = c.iface
            assert await i.call_mark_good() == "a"
            await i.call_mark_bad("b")
            slots = await i.get_slots()
            assert slots[1][3] is False  # b: not bootable

    run(main())
    env = decode(dev.grubenv.read_bytes())
    assert env["a_OK"] == "1" and env["b_OK"] == "0"


def test_slots_follow_changes_made_without_the_daemon(bus: PrivateBus, dev: TestDevice, keys: Keys,
                                                      tmp_path: Path) -> None:
    """`pitstop install --local` while the daemon runs: the properties show it within STATUS_MAX_AGE_S."""
    from pitstop.daemon.core import STATUS_MAX_AGE_S
    from pitstop.ota.installer import Installer

    bundle = make_bundle(tmp_path / "v2.pitb", [rootfs_payload(tmp_path / "v2.img", mixed_data(200_000, 4))], keys,
                         version="2.0.0", security_version=2)  # fmt: skip

    async def main() -> None:
        async with daemon(bus, dev) as (_core, c):
            i: Any = c.iface
            assert await i.get_primary_slot() == "a"
            await asyncio.to_thread(Installer(dev.config()).install, str(bundle))
            await asyncio.sleep(STATUS_MAX_AGE_S + 0.1)
            assert await i.get_primary_slot() == "b" and await i.get_phase() == "activated"

    run(main())


def test_errors_are_typed_and_one_line(bus: PrivateBus, dev: TestDevice) -> None:
    async def main() -> None:
        async with daemon(bus, dev) as (_core, c):
            r = await c.call("StartLoop", "s", "nope")
            assert r.message_type is MessageType.ERROR and r.error_name == "org.pitstop.Error.UnknownLoop"
            assert r.body == ["no loop named 'nope' is configured"]
            r = await c.call("MarkBad", "i", 3)
            assert r.error_name == "org.freedesktop.DBus.Error.InvalidArgs"
            r = await c.call("CheckForUpdate")
            assert r.message_type is MessageType.ERROR and "no update server" in r.body[0]
            r = await c.call("NoSuchMethod")
            assert r.error_name == "org.freedesktop.DBus.Error.UnknownMethod"
            r = await c.call("Reboot")
            assert r.message_type is MessageType.ERROR and "not enabled" in r.body[0]

    run(main())


def test_reboot_calls_the_reboot_action(bus: PrivateBus, dev: TestDevice) -> None:
    calls: list[str] = []

    async def main() -> None:
        async with daemon(bus, dev, reboot=lambda: calls.append("reboot")) as (_core, c):
            await c.iface.call_reboot()  # type: ignore[attr-defined]

    run(main())
    assert calls == ["reboot"]


def test_second_install_while_one_runs_is_refused(bus: PrivateBus, dev: TestDevice) -> None:
    release = threading.Event()

    def slow_install(source: str, progress: ProgressFn, http: object) -> str:
        progress("write", 1, 2)
        release.wait(20)
        return "9.9.9"

    async def main() -> None:
        async with daemon(bus, dev, installer=slow_install) as (_core, c):
            await c.iface.call_install("/first")  # type: ignore[attr-defined]
            r = await c.call("Install", "s", "/second")
            assert r.error_name == "org.pitstop.Error.Busy", r.body
            release.set()
            assert (await c.wait_signal("Completed"))[0] is True

    run(main())


PRIVILEGED_CALLS = [
    ("Install", ["string:/nowhere.pitb"]),
    ("CheckForUpdate", []),
    ("MarkGood", []),
    ("MarkBad", ["string:b"]),
    ("Reboot", []),
    ("StartLoop", ["string:x"]),
    ("StopLoop", ["string:x"]),
]


def _dbus_send(bus: PrivateBus, member: str, args: list[str], user: int | None) -> Any:
    return bus.send(f"--dest={BUS_NAME}", PATH, f"{INTERFACE}.{member}", *args, user=user)


@root_only
def test_unprivileged_caller_is_refused_by_the_daemon(bus: PrivateBus, dev: TestDevice) -> None:
    """A permissive bus lets every call through: the daemon itself refuses `nobody`, and still answers reads."""
    reboots: list[int] = []

    async def main() -> None:
        async with daemon(bus, dev, reboot=lambda: reboots.append(1)):
            for member, args in PRIVILEGED_CALLS:
                p = await asyncio.to_thread(_dbus_send, bus, member, args, NOBODY)
                assert p.returncode != 0 and "org.pitstop.Error.NotAuthorized" in p.stderr, (member, p.stderr)
            p = await asyncio.to_thread(bus.send, f"--dest={BUS_NAME}", PATH, "org.freedesktop.DBus.Properties.Get",
                                        f"string:{INTERFACE}", "string:BootedSlot", user=NOBODY)  # fmt: skip
            assert p.returncode == 0 and '"a"' in p.stdout, p.stderr

    before = dev.snapshot()
    run(main())
    assert dev.snapshot() == before and reboots == []


@root_only
def test_control_group_members_may_call(bus: PrivateBus, dev: TestDevice) -> None:
    async def main() -> None:
        async with daemon(bus, dev, control_group="nogroup"):  # nobody's own group
            p = await asyncio.to_thread(_dbus_send, bus, "MarkGood", [], NOBODY)
            assert p.returncode == 0 and '"a"' in p.stdout, p.stderr

    run(main())


@root_only
def test_bus_policy_file_refuses_unprivileged_callers() -> None:
    policy = Path(dbus_api.__file__).parent / "data" / "org.pitstop.Daemon1.conf"
    with PrivateBus("system", include=policy) as bus:
        dev_root = Path(bus.dir) / "dev"
        from bundlekit import make_keys

        dev = make_device(dev_root, make_keys(Path(bus.dir) / "keys"))

        async def main() -> None:
            async with daemon(bus, dev):
                p = await asyncio.to_thread(_dbus_send, bus, "MarkGood", [], NOBODY)
                assert "AccessDenied" in p.stderr, p.stderr  # refused by the bus, before the daemon sees it
                p = await asyncio.to_thread(bus.send, f"--dest={BUS_NAME}", PATH, "org.freedesktop.DBus.Properties.Get",
                                            f"string:{INTERFACE}", "string:BootedSlot", user=NOBODY)  # fmt: skip
                assert p.returncode == 0, p.stderr
                p = await asyncio.to_thread(_dbus_send, bus, "MarkGood", [], None)  # root
                assert p.returncode == 0, p.stderr

        run(main())


def test_check_for_update_goes_through_the_update_agent(bus: PrivateBus, dev: TestDevice, keys: Keys,
                                                       tmp_path: Path) -> None:
    """CheckForUpdate is one poll of the hawkBit server by the update agent; a deployment it finds is installed,
    with Progress and StateChanged signals on the way and Completed at the end."""
    from ddikit import TENANT, HawkbitTarget
    from httpkit import FileServer

    from pitstop.daemon.config import UpdateConfig
    from pitstop.daemon.ddi import DdiClient, TargetToken
    from pitstop.daemon.update_agent import UpdateAgent

    bundle = make_bundle(tmp_path / "v2.pitb", [rootfs_payload(tmp_path / "v2.img", mixed_data(400_000, 5))], keys,
                         version="2.0.0", security_version=2)  # fmt: skip
    with HawkbitTarget() as srv, FileServer() as cdn:
        client = DdiClient(srv.base_url, TENANT, srv.device, auth=TargetToken(srv.token))
        cfg = UpdateConfig(server=srv.base_url, controller_id=srv.device, token=srv.token, reboot="manual")

        async def main() -> None:
            async with daemon(bus, dev) as (core, c):
                core.flow = UpdateAgent(core, cfg, dev.data / "state", client=client)
                assert await c.iface.call_check_for_update() is False  # type: ignore[attr-defined]
                srv.assign("3", cdn.add("v2.pitb", bundle), size=bundle.stat().st_size,
                           sha256=hashlib.sha256(bundle.read_bytes()).hexdigest(),
                           filename="v2.pitb")  # fmt: skip
                assert await c.iface.call_check_for_update() is True  # type: ignore[attr-defined]
                assert (await c.wait_signal("StateChanged"))[0] == "installing"
                assert (await c.wait_signal("Progress"))[2] > 0
                ok, message = await c.wait_signal("Completed")
                assert ok is True and "version 2.0.0" in message, message
                assert await c.iface.get_update_state() == "installed"  # type: ignore[attr-defined]

        try:
            run(main())
        finally:
            client.close()
    assert srv.executions("3")[0] == "proceeding"
    assert [(m, p) for m, p, _ in srv.requests][:2] == [("GET", srv.root), ("PUT", f"{srv.root}/configData")]
