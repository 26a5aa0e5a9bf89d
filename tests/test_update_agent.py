"""The update agent end to end on a file-backed A/B device: a deployment from a stateful hawkBit stand-in
(tests/ddikit.py) over real HTTP, the install through the daemon core, the reboot (GRUB's pure model from
devicekit), the health gate after it, the commit or the rollback, and the feedback the server receives at
each stage. Each "boot" is a fresh core and agent on the same device, continuing from what is on disk."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import pytest
from agentkit import Boot, Units, boot, run, settled_boot, state_dir
from bundlekit import Keys, make_bundle, mixed_data, rootfs_payload
from ddikit import TENANT, HawkbitTarget
from devicekit import TestDevice, make_device
from httpkit import FileServer

from pitstop.daemon.config import LoopConfig, UpdateConfig
from pitstop.daemon.core import UpdateState
from pitstop.daemon.limits import Limits
from pitstop.daemon.restart_policy import LoopState
from pitstop.daemon.supervisor import Supervisor
from pitstop.daemon.update_agent import public_source
from pitstop.daemon.update_record import OUTBOX_FILE, RECORD_FILE, Kind, Origin, RecordStore, Stage, UpdateRecord
from pitstop.ota.bundle_spec import PayloadSpec
from pitstop.ota.slot_state import Phase

T = TypeVar("T")
SMALL_CHUNKS = (4096, 16384, 65536)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("agent-bundles")
    v2 = make_bundle(root / "v2.pitb", [rootfs_payload(root / "v2.img", mixed_data(700_000, 2))], keys,
                     version="2.0.0", security_version=2, chunking=SMALL_CHUNKS)  # fmt: skip
    other = make_bundle(root / "other.pitb", [rootfs_payload(root / "o.img", mixed_data(200_000, 3))], keys,
                        version="2.0.0", compatible="someone-else", chunking=SMALL_CHUNKS)  # fmt: skip
    (root / "files").mkdir()
    (root / "files" / "app.conf").write_text("threshold = 0.7\n")
    files = make_bundle(root / "files.pitb", [PayloadSpec("config", "files", root / "files", "etc/app")], keys,
                        version="2.1.0", security_version=2, chunking=SMALL_CHUNKS)  # fmt: skip
    return {"v2": v2, "other": other, "files": files}


@pytest.fixture
def dev(tmp_path: Path, keys: Keys) -> TestDevice:
    return make_device(tmp_path / "dev", keys)


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def update_config(srv: HawkbitTarget | None, **kw: Any) -> UpdateConfig:
    base: dict[str, Any] = {"gate_deadline_s": 10.0, "gate_hold_s": 0.3, "gate_required_units": ("app.service",)}
    if srv is not None:
        base |= {"server": srv.base_url, "tenant": TENANT, "controller_id": srv.device, "token": srv.token}
    return UpdateConfig(**(base | kw))


def assign(srv: HawkbitTarget, cdn: FileServer, bundle: Path, action: str = "7", **kw: Any) -> None:
    srv.assign(action, cdn.add(bundle.name, bundle), size=bundle.stat().st_size, sha256=sha256(bundle),
               filename=bundle.name, **kw)  # fmt: skip


def first_boot(dev: TestDevice) -> dict[str, str]:
    """A boot with nothing to do (the routine commit records the factory slot); the device's files after it."""
    settled_boot(dev, update_config(None))
    return dev.snapshot()


async def installed_from_server(dev: TestDevice, cfg: UpdateConfig, srv: HawkbitTarget) -> Boot:
    async with boot(dev, cfg) as b:
        assert await b.agent.check_now() is True
        await b.agent.settled()
        return b


# -- the whole flow --------------------------------------------------------------------------------------------


def test_deployment_installs_reboots_passes_the_gate_and_reports_success(
    dev: TestDevice, bundles: dict[str, Path]
) -> None:
    with HawkbitTarget() as srv, FileServer() as cdn:
        assign(srv, cdn, bundles["v2"])
        cfg = update_config(srv)
        b = run(installed_from_server(dev, cfg, srv))
        assert b.reboots == ["reboot"], "policy immediate: rebooted as soon as the install was done"
        assert b.core.state is UpdateState.REBOOTING
        rec = RecordStore(state_dir(dev) / RECORD_FILE).load()
        assert rec is not None and rec.stage is Stage.INSTALLED and rec.kind is Kind.ROOTFS
        assert rec.action_id == "7" and rec.target_slot == "b" and rec.version == "2.0.0"
        ex = srv.executions("7")
        assert ex[0] == "proceeding" and "download" in ex and ex[-1] == "proceeding", ex
        assert "rebooting into it now" in srv.feedback("7")[-1][2][0]
        assert srv.attributes["compatible"] == "pitstop-test" and srv.attributes["booted_slot"] == "a"
        assert all(auth == f"TargetToken {srv.token}" for _, _, auth in srv.requests)

        assert dev.reboot() == "b"  # GRUB: b is primary with tries

        b2 = settled_boot(dev, cfg)
        assert b2.core.state is UpdateState.COMMITTED
        st = b2.core.status.slots
        assert st.booted == "b" and st.primary == "b" and st.phase is Phase.NONE
        assert st.committed_security_version == 2
        final = srv.final("7")
        assert len(final) == 1 and final[0][1] == "success", final
        assert "version 2.0.0 committed (slot b)" in final[0][2][0]
        assert any("unit app.service is active" in d for d in final[0][2])
        assert not (state_dir(dev) / RECORD_FILE).exists() and not (state_dir(dev) / OUTBOX_FILE).exists()
        assert b2.reboots == []


def test_failed_gate_marks_bad_reboots_into_the_fallback_and_reports_the_reason(
    dev: TestDevice, bundles: dict[str, Path]
) -> None:
    with HawkbitTarget() as srv, FileServer() as cdn:
        assign(srv, cdn, bundles["v2"])
        cfg = update_config(srv)
        run(installed_from_server(dev, cfg, srv))
        assert dev.reboot() == "b"

        b = settled_boot(dev, cfg, units=Units(**{"app.service": "failed"}))
        assert b.reboots == ["reboot"], "a failed gate reboots at once, whatever the reboot policy"
        rec = RecordStore(state_dir(dev) / RECORD_FILE).load()
        assert rec is not None and rec.stage is Stage.ROLLING_BACK
        assert "unit app.service is failed" in rec.message
        assert srv.final("7") == [], "the result is reported from the fallback, once it runs"
        assert dev.reboot() == "a"  # b is marked bad: GRUB boots a

        b = settled_boot(dev, cfg)
        assert b.core.state is UpdateState.FAILED
        st = b.core.status.slots
        assert st.booted == "a" and st.primary == "a" and st.phase is Phase.NONE
        assert not next(v for v in st.slots if v.name == "b").bootable
        final = srv.final("7")
        assert len(final) == 1 and final[0][1] == "failure"
        assert "health gate failed: unit app.service is failed" in final[0][2][0]
        assert "slot a runs again" in final[0][2][0]


def test_gate_deadline_without_the_required_unit(dev: TestDevice, bundles: dict[str, Path]) -> None:
    """A unit that never becomes active (still activating) fails the gate at the deadline, not before."""
    with HawkbitTarget() as srv, FileServer() as cdn:
        assign(srv, cdn, bundles["v2"])
        cfg = update_config(srv, gate_deadline_s=1.5)
        run(installed_from_server(dev, cfg, srv))
        dev.reboot()

        async def trial() -> tuple[Boot, float]:
            loop = asyncio.get_running_loop()
            async with boot(dev, cfg, units=Units(**{"app.service": "activating"})) as b:
                t0 = loop.time()
                await b.agent.settled()
                return b, loop.time() - t0

        _b, took = run(trial())
        assert 1.2 < took < 10, took
        rec = RecordStore(state_dir(dev) / RECORD_FILE).load()
        assert rec is not None and rec.stage is Stage.ROLLING_BACK
        assert "not healthy after 1.5 s: unit app.service is activating" in rec.message


def test_new_slot_that_never_comes_up_is_reported_after_grub_falls_back(
    dev: TestDevice, bundles: dict[str, Path]
) -> None:
    with HawkbitTarget() as srv, FileServer() as cdn:
        assign(srv, cdn, bundles["v2"])
        cfg = update_config(srv)
        run(installed_from_server(dev, cfg, srv))
        booted = [dev.reboot() for _ in range(4)]  # b hangs before the daemon starts: GRUB spends its tries
        assert booted == ["b", "b", "b", "a"], booted

        b = settled_boot(dev, cfg)
        assert b.core.status.slots.booted == "a" and b.core.status.slots.phase is Phase.NONE
        final = srv.final("7")
        assert len(final) == 1 and final[0][1] == "failure"
        assert "slot b with version 2.0.0 did not come up" in final[0][2][0]


def test_result_waits_for_an_unreachable_server_and_arrives_once(dev: TestDevice, bundles: dict[str, Path]) -> None:
    with HawkbitTarget() as srv, FileServer() as cdn:
        assign(srv, cdn, bundles["v2"])
        cfg = update_config(srv)
        run(installed_from_server(dev, cfg, srv))
        dev.reboot()
        srv.down = True

        async def trial() -> None:
            async with boot(dev, cfg) as b:
                await b.agent.settled()
                assert b.core.state is UpdateState.COMMITTED
                assert await b.agent.check_now() is False  # down: nothing found, result still waiting

        run(trial())
        out = RecordStore(state_dir(dev) / OUTBOX_FILE).load()
        assert out is not None and out.success is True and out.action_id == "7"
        assert srv.final("7") == []

        async def later_boot() -> None:  # the daemon restarted meanwhile; the server is back
            async with boot(dev, cfg) as b:
                srv.down = False
                assert await b.agent.check_now() is False  # the action is closed by the result
                assert await b.agent.check_now() is False

        run(later_boot())
        final = srv.final("7")
        assert len(final) == 1 and final[0][1] == "success"
        assert not (state_dir(dev) / OUTBOX_FILE).exists()


def test_install_failure_is_reported_and_changes_nothing(dev: TestDevice, bundles: dict[str, Path]) -> None:
    with HawkbitTarget() as srv, FileServer() as cdn:
        assign(srv, cdn, bundles["other"])
        before = first_boot(dev)
        b = run(installed_from_server(dev, update_config(srv), srv))
        assert b.reboots == [] and b.core.state is UpdateState.FAILED
        final = srv.final("7")
        assert len(final) == 1 and final[0][1] == "failure"
        assert "install failed" in final[0][2][0] and "someone-else" in final[0][2][0], final
        after = {k: v for k, v in dev.snapshot().items() if "pitstop/daemon" not in k}
        assert after == {k: v for k, v in before.items() if "pitstop/daemon" not in k}
        assert not (state_dir(dev) / RECORD_FILE).exists()


def test_closed_maintenance_window_waits_then_cancel_is_confirmed(dev: TestDevice, bundles: dict[str, Path]) -> None:
    with HawkbitTarget() as srv, FileServer() as cdn:
        assign(srv, cdn, bundles["v2"], update="attempt", window="unavailable")
        before = first_boot(dev)

        async def main() -> None:
            async with boot(dev, update_config(srv)) as b:
                assert await b.agent.check_now() is True
                assert await b.agent.check_now() is True  # told once, not at every poll
                srv.cancel("7")
                assert await b.agent.check_now() is False
                await b.agent.settled()

        run(main())
        assert srv.feedback("7") == [("scheduled", "none", ["waiting: the server's maintenance window is closed"])]
        assert srv.cancel_feedback[0][:2] == ("closed", "success")
        assert srv.actions["7"].canceled
        assert {k: v for k, v in dev.snapshot().items() if "pitstop/daemon" not in k} == {
            k: v for k, v in before.items() if "pitstop/daemon" not in k
        }


def test_manual_reboot_policy_waits_and_refuses_a_cancel(dev: TestDevice, bundles: dict[str, Path]) -> None:
    with HawkbitTarget() as srv, FileServer() as cdn:
        assign(srv, cdn, bundles["v2"])
        cfg = update_config(srv, reboot="manual")

        async def main() -> None:
            async with boot(dev, cfg) as b:
                assert await b.agent.check_now() is True
                await b.agent.settled()
                assert b.reboots == [] and b.core.state is UpdateState.INSTALLED
                srv.cancel("7")
                await b.agent.check_now()
                assert srv.cancel_feedback[-1][0] == "rejected", srv.cancel_feedback
                with pytest.raises(Exception, match="waits for its reboot"):
                    b.agent.install_local(str(bundles["v2"]))
                await b.core.reboot()  # the operator's Reboot()
                assert b.reboots == ["reboot"]

        run(main())
        assert "waiting for a reboot by an operator" in srv.feedback("7")[-1][2][0]


def test_download_only_assignment_is_closed_with_the_reason(dev: TestDevice, bundles: dict[str, Path]) -> None:
    with HawkbitTarget() as srv, FileServer() as cdn:
        assign(srv, cdn, bundles["v2"], update="skip")
        run(installed_from_server(dev, update_config(srv), srv))
        final = srv.final("7")
        assert len(final) == 1 and final[0][1] == "failure" and "download-only" in final[0][2][0]
        assert dev.env()["b_OK"] == "0"


# -- local bundles and models/files ---------------------------------------------------------------------------


def test_local_bundle_goes_through_the_same_gate(dev: TestDevice, bundles: dict[str, Path]) -> None:
    cfg = update_config(None)

    async def install() -> Boot:
        async with boot(dev, cfg) as b:
            b.agent.install_local(str(bundles["v2"]))
            await b.agent.settled()
            return b

    b = run(install())
    assert b.reboots == ["reboot"]
    rec = RecordStore(state_dir(dev) / RECORD_FILE).load()
    assert rec is not None and rec.origin is Origin.LOCAL and rec.source == str(bundles["v2"])
    dev.reboot()

    b = settled_boot(dev, cfg, units=Units(**{"app.service": "failed"}))
    assert b.reboots == ["reboot"] and b.core.status.slots.primary == "a"
    dev.reboot()

    b = settled_boot(dev, cfg)
    assert b.core.state is UpdateState.FAILED and "unit app.service is failed" in b.core.error
    assert b.agent.last_result is not None and b.agent.last_result.success is False
    assert not (state_dir(dev) / RECORD_FILE).exists() and not (state_dir(dev) / OUTBOX_FILE).exists()


def test_files_only_update_is_gated_without_a_reboot_and_rolled_back(dev: TestDevice, bundles: dict[str, Path]) -> None:
    link = dev.data / "etc" / "app"

    async def install(units: Units) -> Boot:
        async with boot(dev, update_config(None), units=units) as b:
            b.agent.install_local(str(bundles["files"]))
            await b.agent.settled()
            return b

    b = run(install(Units(**{"app.service": "failed"})))
    assert b.reboots == [] and b.core.state is UpdateState.FAILED
    assert "back on the previous models/files" in b.core.error
    assert not link.exists(), "the link goes back to what was there: nothing"
    assert b.core.status.pending_bundle is None

    b = run(install(Units(**{"app.service": "active"})))
    assert b.reboots == [] and b.core.state is UpdateState.COMMITTED
    assert (link / "app.conf").read_text() == "threshold = 0.7\n"
    assert b.core.status.pending_bundle is None and b.core.status.slots.committed_security_version == 2


def model_bundle(out: Path, keys: Keys, model: Path, version: str, security_version: int) -> Path:
    """A model-only bundle: the ONNX file with its description (the shipped TOML, as the bundle's JSON)."""
    from pitstop.inference.test_models import ORIENTATION, locate

    desc = tomllib.loads(locate(ORIENTATION).description.read_text())
    spec = PayloadSpec("orient", "model", model, "models/orient", desc)
    return make_bundle(out, [spec], keys, version=version, security_version=security_version)


def test_model_update_with_a_real_loop_is_gated_rolled_back_then_committed(
    dev: TestDevice, keys: Keys, tmp_path: Path
) -> None:
    """A loop runs the real classifier from a model payload at 20 frames/s. A model-only update with a broken
    model: the loop fails on it, the gate fails at its deadline, the previous model comes back and the loop
    runs again. The next update, a working model, keeps the throughput and is committed. No reboot."""
    from pitstop.inference.test_models import ORIENTATION, locate
    from pitstop.ota.installer import Installer

    found = locate(ORIENTATION)
    name = found.model.name
    good = model_bundle(tmp_path / "m1.pitb", keys, found.model, "1.0.0", 1)
    broken_file = tmp_path / "broken" / name
    broken_file.parent.mkdir()
    broken_file.write_bytes(b"not an onnx model" * 100)
    broken = model_bundle(tmp_path / "m2.pitb", keys, broken_file, "2.0.0", 2)
    again = model_bundle(tmp_path / "m3.pitb", keys, found.model, "3.0.0", 3)
    Installer(dev.config()).install(str(good))
    model = dev.data / "models" / "orient" / name
    assert model.is_file()
    lc = LoopConfig(name="orient", model=model, source_opts={"width": "160", "height": "120", "fps": "20"},
                    sink=f"jsonl:{tmp_path / 'out.jsonl'}", runtime="onnxruntime", providers=("cpu",), threads=1,
                    restart_min_s=0.5, restart_max_s=1.0)  # fmt: skip
    cfg = update_config(None, gate_required_units=(), gate_deadline_s=12.0, gate_hold_s=2.0)

    async def until(cond: Any, what: str, timeout: float = 30) -> None:
        end = asyncio.get_running_loop().time() + timeout
        while not cond():
            assert asyncio.get_running_loop().time() < end, f"no {what} within {timeout} s"
            await asyncio.sleep(0.1)

    async def main() -> None:
        sup = Supervisor([lc], figures_every_s=0.5, limits=Limits.fallback("test"), cache_dir=tmp_path / "cache")
        try:
            await sup.start("orient")  # the daemon starts its loops, then the agent
            async with boot(dev, cfg, loops=sup) as b:
                await b.agent.settled()  # the first model was on trial: the gate commits it
                assert b.core.state is UpdateState.COMMITTED, b.core.error
                await until(lambda: b.agent.baseline().get("orient", 0) > 10, "baseline figures")
                b.agent.install_local(str(broken))
                await b.agent.settled()
                assert b.core.state is UpdateState.FAILED
                assert "loop orient is" in b.core.error and "back on the previous models/files" in b.core.error
                assert model.read_bytes() == found.model.read_bytes(), "the previous model is live again"
                await until(lambda: sup.status("orient").state is LoopState.RUNNING, "the loop on the old model")
                await until(lambda: b.agent.baseline().get("orient", 0) > 10, "figures on the old model")
                b.agent.install_local(str(again))
                await b.agent.settled()
                assert b.core.state is UpdateState.COMMITTED, b.core.error
                assert b.agent.last_result is not None
                assert any(d.startswith("loop orient: ") and "needs" in d for d in b.agent.last_result.details)
                assert b.reboots == []
        finally:
            await sup.shutdown()

    run(main(), timeout=150)
    st = json.loads((dev.data / "pitstop" / "state.json").read_text())
    assert st["payloads"]["models/orient"]["pending"] is None


# -- across crashes ------------------------------------------------------------------------------------------


def test_trial_boot_without_a_record_is_still_gated(dev: TestDevice, bundles: dict[str, Path]) -> None:
    """Installed with `pitstop install --local` while the daemon was stopped: the gate still decides."""
    from pitstop.ota.installer import Installer

    Installer(dev.config()).install(str(bundles["v2"]))
    dev.reboot()

    b = settled_boot(dev, update_config(None))
    assert b.core.state is UpdateState.COMMITTED and b.core.status.slots.primary == "b"


@pytest.mark.parametrize("stage", [Stage.INSTALLING, Stage.INSTALLED, Stage.VERIFYING])
def test_resume_from_each_recorded_stage(dev: TestDevice, bundles: dict[str, Path], stage: Stage) -> None:
    """The daemon died right after recording `stage` (the install itself had finished): the next start
    carries on and the server hears one result."""
    from pitstop.ota.installer import Installer

    with HawkbitTarget() as srv, FileServer() as cdn:
        assign(srv, cdn, bundles["v2"])
        Installer(dev.config()).install(str(bundles["v2"]))
        rec = UpdateRecord(Origin.DDI, "http://x/v2.pitb", action_id="7", stage=stage,
                           kind=Kind.UNKNOWN if stage is Stage.INSTALLING else Kind.ROOTFS, version="2.0.0",
                           target_slot="b", from_slot="a")  # fmt: skip
        RecordStore(state_dir(dev) / RECORD_FILE).save(rec)
        cfg = update_config(srv)

        async def again(reboot_first: bool) -> Boot:
            if reboot_first:
                dev.reboot()
            async with boot(dev, cfg) as b:
                await b.agent.settled()
                return b

        b = run(again(stage is Stage.VERIFYING))
        if stage is not Stage.VERIFYING:
            assert b.reboots == ["reboot"], "installed and activated: the reboot it missed"
            b = run(again(True))
        assert b.core.state is UpdateState.COMMITTED
        assert [f[1] for f in srv.final("7")] == ["success"]


def test_unreadable_record_is_moved_aside(dev: TestDevice) -> None:
    d = state_dir(dev)
    d.mkdir(parents=True)
    (d / RECORD_FILE).write_text("{not json")

    b = settled_boot(dev, update_config(None))
    assert (d / f"{RECORD_FILE}.unreadable").exists() and not (d / RECORD_FILE).exists()
    assert b.core.state is UpdateState.IDLE


def test_public_source_drops_credentials() -> None:
    assert public_source("https://u:p@cdn.example:8443/a/b.pitb?X-Sig=abc#f") == "https://cdn.example:8443/a/b.pitb"
    assert public_source("/media/usb/b.pitb") == "/media/usb/b.pitb"


def test_record_round_trips(tmp_path: Path) -> None:
    rec = UpdateRecord(Origin.DDI, "s", action_id="3", stage=Stage.DONE, kind=Kind.PAYLOADS, baseline={"a": 1.5},
                       details=("x", "y"), success=False, message="m")  # fmt: skip
    store = RecordStore(tmp_path / "r.json")
    store.save(rec)
    assert store.load() == rec
    assert json.loads((tmp_path / "r.json").read_text())["format"] == 1
    store.clear()
    assert store.load() is None


# -- killed at any point -----------------------------------------------------------------------------------------

DRIVER = Path(__file__).with_name("agent_driver.py")


def drive(dev: TestDevice, srv: HawkbitTarget, marker: Path, *, crash: str | None, kill_after: float | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "PITSTOP_CRASHPOINT"}
    if crash is not None:
        env["PITSTOP_CRASHPOINT"] = crash
    argv = [sys.executable, str(DRIVER), str(dev.config_path), str(state_dir(dev)), srv.base_url, srv.device,
            srv.token, str(marker)]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    assert proc.returncode in (0, -signal.SIGKILL), out
    assert "Traceback" not in out, out
    print(f"--- boot (rc {proc.returncode})\n{out}")
    return proc.returncode


KILLS = [(1, "agent.saved:1", None), (1, "agent.saved:2", None), (2, "agent.saved:1", None),
         (2, "agent.saved:2", None), (2, "agent.saved:3", None), (1, None, 0.4), (1, None, 0.8), (1, None, 1.2),
         (2, None, 0.5), (1, "activate:1", None)]  # fmt: skip
# (1, "activate:1"): between the record of the activation and the boot switch, the window a timed kill once hit.


@pytest.mark.parametrize(("at_boot", "crash", "kill_after"), KILLS)
def test_killed_at_any_point_the_update_still_ends_in_one_result(
    dev: TestDevice, bundles: dict[str, Path], tmp_path: Path, at_boot: int, crash: str | None, kill_after: float | None
) -> None:
    """The agent is SIGKILLed after a durable step (crashpoint) or at a time (on this machine: during the install,
    in the gate), in its first or second boot; each kill is a power cut (GRUB picks the next boot). It carries
    on each time; in the end the device runs the new slot, committed, and the server has exactly one result."""
    marker = tmp_path / "reboot-requested"
    with HawkbitTarget() as srv, FileServer() as cdn:
        assign(srv, cdn, bundles["v2"])
        for boot_no in range(1, 9):
            here = boot_no == at_boot
            rc = drive(dev, srv, marker, crash=crash if here else None, kill_after=kill_after if here else None)
            if marker.exists() or rc != 0:
                marker.unlink(missing_ok=True)
                dev.reboot()
            elif srv.final("7"):
                break
        final = srv.final("7")
        assert [f[1] for f in final] == ["success"], srv.feedback("7")
    from pitstop.ota.device import Device

    st = Device(dev.config()).status().slots
    assert st.pending is None and st.committed_security_version == 2 and st.primary == "b"
    assert not (state_dir(dev) / RECORD_FILE).exists() and not (state_dir(dev) / OUTBOX_FILE).exists()
