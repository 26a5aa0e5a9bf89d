"""The daemon's real update agent on a file-backed A/B device (tests/devicekit.py), served by `pitstop server`:
the deployment is polled, the bundle streamed from the server's artifact endpoint into the inactive slot, the
device reboots into it, the health gate decides, and the server ends with the agent's verdict: the action
closed, the device's version and attributes, the rollout finished (or stopped by the failure)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentkit import Units, boot, run, settled_boot
from bundlekit import Keys, make_bundle, mixed_data, rootfs_payload, run_cli
from devicekit import TestDevice, make_device
from serverkit import TENANT, Site, site

from pitstop.daemon.config import UpdateConfig
from pitstop.ota.server import deployments
from pitstop.ota.server.records import ActionStatus, RolloutStatus

DEVICE = "dev-0001"


@pytest.fixture(scope="module")
def v2(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Path:
    root = tmp_path_factory.mktemp("agent-server")
    return make_bundle(
        root / "v2.pitb",
        [rootfs_payload(root / "v2.img", mixed_data(700_000, 2))],
        keys,
        version="2.0.0",
        security_version=2,
        chunking=(4096, 16384, 65536),
    )


@pytest.fixture
def dev(tmp_path: Path, keys: Keys) -> TestDevice:
    return make_device(tmp_path / "dev", keys)


@pytest.fixture
def s(tmp_path: Path, keys: Keys) -> Iterator[Site]:
    with site(tmp_path, keyring=keys.keyring) as st:
        yield st


def config(s: Site, token: str, device: str = DEVICE) -> UpdateConfig:
    return UpdateConfig(
        server=s.url,
        tenant=TENANT,
        controller_id=device,
        token=token,
        gate_deadline_s=10.0,
        gate_hold_s=0.3,
        gate_required_units=("app.service",),
    )


def poll(dev: TestDevice, cfg: UpdateConfig) -> list[str]:
    """One boot of the agent that polls the server once and goes as far as it can; the reboots it asked for."""

    async def main() -> list[str]:
        async with boot(dev, cfg) as b:
            await b.agent.check_now()
            await b.agent.settled()
            return b.reboots

    return run(main())


def test_agent_installs_from_the_server(s: Site, dev: TestDevice, v2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = s.add_device(DEVICE, group="rig")
    made = s.deploy(s.upload(v2), [DEVICE])
    cfg = config(s, token)
    assert poll(dev, cfg) == ["reboot"]
    assert s.device(DEVICE).attributes["booted_slot"] == "a"
    assert dev.reboot() == "b"
    settled_boot(dev, cfg)  # the health gate passes; the result goes to the server
    action = s.action(1)
    assert action.status is ActionStatus.SUCCESS, action
    assert s.rollout(made.rollout.id).status is RolloutStatus.FINISHED
    history = s.store.read(lambda c: deployments.history(c, 1))
    executions = [e.execution for e in history]
    assert executions[0] == "proceeding" and "download" in executions and executions[-1] == "closed"
    assert "version 2.0.0 committed (slot b)" in history[-1].details[0]
    assert poll(dev, cfg) == []  # asked for its attributes again after the action: they say what now runs
    d = s.device(DEVICE)
    assert (d.version, d.booted_slot) == ("2.0.0", "b")
    assert (d.attributes["compatible"], d.attributes["bundle_version"]) == ("pitstop-test", "2.0.0")
    shown = json.loads(run_cli(capsys, "server", "device", "show", DEVICE, "--json", "--data", s.store.data_dir).out)
    assert shown["deployment"]["status"] == "success" and shown["booted_slot"] == "b"


def test_agent_failure_stops_the_rollout(s: Site, dev: TestDevice, v2: Path) -> None:
    tokens = {d: s.add_device(d) for d in (DEVICE, "dev-0002")}
    made = s.deploy(s.upload(v2), list(tokens), first_wave=1, waves=(100.0,), max_failure=0.0)
    (first,), (second,) = made.waves  # the seeded order decides which one goes first: this device plays it
    cfg = config(s, tokens[first], first)
    assert poll(dev, cfg) == ["reboot"]
    assert dev.reboot() == "b"
    settled_boot(dev, cfg, units=Units(**{"app.service": "failed"}))  # the gate fails: back to slot a
    assert dev.reboot() == "a"
    settled_boot(dev, cfg)  # the failure is reported from slot a
    action = s.store.read(lambda c: deployments.device_actions(c, first))[0]
    assert action.status is ActionStatus.FAILURE
    r = s.rollout(made.rollout.id)
    assert r.status is RolloutStatus.STOPPED and "1 of 1" in (r.reason or "")
    assert s.store.read(lambda c: deployments.current_action(c, second)) is None  # never asked
