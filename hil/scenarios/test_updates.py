"""The update scenarios, on any target (`pytest hil/ --target qemu`, docs/hil.md): a device flashed from the
rig image and provisioned for a real `pitstop server` on the rig host, updated through it.

`test_update_a_to_b_through_the_server` runs in the default suite (tests/test_hil_scenarios.py runs it);
the rest are marked slow: `pytest hil/ -m ''` runs them all (about 40 minutes under TCG).
"""

from __future__ import annotations

import contextlib
import random
import re
import time
from typing import Any

import pytest

from pitstop.hil.errors import HilError
from pitstop.hil.site import Device, SiteServer, Updates

FINAL = {"success", "failure", "canceled"}


def updated_to_b(dev: Device, site: SiteServer, updates: Updates) -> dict[str, Any]:
    """Deploy the good bundle, let the device take it; it reboots into b, commits, and reports success."""
    rollout = site.deploy(site.upload(updates.good), dev.id)
    dev.target.timeline.rig("deploy", f"{rollout}: {updates.good.name} to {dev.id}")
    start = dev.target.console.mark()
    dev.check_for_update()
    dev.reboot_marks("b", 1200, start=start)
    action = site.wait_action(dev.id, FINAL, 180)
    assert action["status"] == "success", site.details(action)
    return action


def test_update_a_to_b_through_the_server(device: Device, site: SiteServer, updates: Updates) -> None:
    """Flash, first boot on a; the server's deployment downloaded, installed into b, rebooted into, gated,
    committed and reported; the server sees the device's new version and slot."""
    dev = device
    assert dev.slots() == "a:good b:empty"
    action = updated_to_b(dev, site, updates)
    seen = [e["execution"] for e in action["history"]]
    assert "download" in seen and seen[-1] == "closed", seen
    st = dev.status()
    assert st["booted"] == "b" and st["primary"] == "b" and st["phase"] == "none", st
    assert dev.slots() == "b:good a:good"
    assert st["committed_security_version"] == 2, st
    # The server asks for the device's attributes once an action ends; they come with the next poll.
    dev.check_for_update()
    d = site.wait_device(dev.id, lambda d: d["booted_slot"] == "b", 60)
    assert d["version"] == updates.good_version and d["attributes"]["bundle_version"] == updates.good_version, d
    # Health reports (OTLP, to the endpoint provisioned with the server's address) arrive from slot b too.
    d = site.wait_device(dev.id, lambda d: bool(d["health"]) and d["health"].get("slot") == "b", 120)


@pytest.mark.slow
def test_rootfs_that_does_not_boot_rolls_back_and_is_reported(
    device: Device, site: SiteServer, updates: Updates
) -> None:
    """A signed bundle whose rootfs cannot boot: GRUB spends slot b's tries and falls back to a by itself; the
    daemon on a reports the failure to the server."""
    dev = device
    site.deploy(site.upload(updates.no_boot), dev.id)
    start = dev.target.console.mark()
    dev.check_for_update()
    dev.target.console.wait_for(r"pitstop-grub: booting slot b\b", 900, start=start)
    fallback = dev.target.console.wait_for(r"pitstop-grub: booting slot a\b", 600, start=start)
    back_on_a_and_reported(dev, site, fallback.index)


@pytest.mark.slow
def test_rootfs_stuck_in_emergency_mode_rolls_back(device: Device, site: SiteServer, updates: Updates) -> None:
    """A signed bundle whose userspace ends in emergency mode (as a failing mount does): nobody is at a device's
    console, so the image's emergency drop-in says why and reboots; each boot spends one of b's tries, GRUB
    falls back to a, and the daemon on a reports the failure."""
    dev = device
    site.deploy(site.upload(updates.emergency), dev.id)
    start = dev.target.console.mark()
    dev.check_for_update()
    into_b = dev.target.console.wait_for(r"pitstop-grub: booting slot b\b", 1200, start=start)
    said = dev.target.console.wait_for(r"pitstop: emergency mode.*rebooting in \d+ s", 600, start=into_b.index)
    fallback = dev.target.console.wait_for(r"pitstop-grub: booting slot a\b", 1500, start=said.index)
    tries = len(re.findall(r"pitstop-grub: booting slot b\b", dev.target.console.text(start, fallback.index)))
    dev.target.timeline.rig("fallback", f"GRUB back on a after {tries} boot(s) of b in emergency mode")
    assert tries >= 1
    back_on_a_and_reported(dev, site, fallback.index)


def back_on_a_and_reported(dev: Device, site: SiteServer, fallback: int) -> None:
    """After GRUB fell back (console line `fallback`): a committed again, b not good, the failure reported."""
    dev.target.wait_ready("a", 600, start=fallback)
    action = site.wait_action(dev.id, FINAL, 180)
    assert action["status"] == "failure", site.details(action)
    assert "did not come up" in site.details(action), site.details(action)
    st = dev.status()
    assert st["booted"] == "a" and st["primary"] == "a", st
    assert not any(s["name"] == "b" and s["content"] == "good" for s in st["slots"]), st


@pytest.mark.slow
def test_unsigned_wrong_key_and_downgrade_bundles_are_refused_and_reported(
    device: Device, site: SiteServer, updates: Updates
) -> None:
    """Each bad bundle goes to the device through the server (which keeps no keyring here, so it forwards
    them); the device refuses each before writing anything and reports why; slot a runs on untouched."""
    dev = device
    before = dev.status()
    for bundle, why in (
        (updates.unsigned, "not signed"),
        (updates.wrong_key, "keyring"),
        (updates.downgrade, "downgrade refused"),
    ):
        site.deploy(site.upload(bundle), dev.id)
        dev.check_for_update()
        action = site.wait_action(dev.id, FINAL, 300)
        text = site.details(action)
        assert action["status"] == "failure", text
        assert why in text.lower(), text
        dev.target.timeline.rig("refused", f"{bundle.name}: {text.splitlines()[-1][:160]}")
    after = dev.status()
    # The slots, their records and the commit floor are as they were; the daemon's own part (its loops' live
    # figures, the last update error) moves on by design.
    assert {k: v for k, v in after.items() if k != "daemon"} == {k: v for k, v in before.items() if k != "daemon"}
    assert "downgrade refused" in after["daemon"]["update_error"], after["daemon"]


@pytest.mark.slow
def test_network_cut_mid_download_resumes(device: Device, site: SiteServer, updates: Updates) -> None:
    """The link goes down while the bundle streams into slot b and comes back 40 s later: the download resumes
    from where it was (Range), the update completes and commits."""
    dev = device
    dev.target.require("network")
    site.deploy(site.upload(updates.good), dev.id)
    start = dev.target.console.mark()
    dev.check_for_update()
    pct = _wait_download(site, dev.id, 25, 600)
    dev.target.network(False)
    time.sleep(40)
    dev.target.network(True)
    dev.target.timeline.rig("network", f"cut at {pct}% of the download for 40 s")
    dev.reboot_marks("b", 1500, start=start)
    action = site.wait_action(dev.id, FINAL, 180)
    assert action["status"] == "success", site.details(action)


def _wait_download(site: SiteServer, device: str, at_least: int, timeout: float) -> int:
    """The download's progress in percent, once it reached `at_least`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        a = site.action(device)
        if a is not None and a["status"] == "running" and a["progress"] and a["last_execution"] == "download":
            done, total = a["progress"]
            if total and done * 100 // total >= at_least:
                return int(done * 100 // total)
        time.sleep(1)
    raise AssertionError(f"the download of {device} did not reach {at_least}% within {timeout:.0f} s")


PHASES = ("download", "reboot", "after-reboot")


@pytest.mark.slow
def test_power_cuts_during_updates(
    device: Device, site: SiteServer, updates: Updates, power_cuts: int, rng: random.Random
) -> None:
    """`--power-cuts N` updates, each cut short by pulling the power at a random point of one phase (the
    download streaming into the slot; the install's end and the boot switch; the first seconds of the new slot,
    before its commit). After each, the device comes back on a good slot by itself, and then finishes the
    update or retries it; at the end no update is left half done."""
    dev = device
    bundle = site.upload(updates.good)
    for n in range(power_cuts):
        st = dev.status()
        booted = st["booted"]
        into = "b" if booted == "a" else "a"
        phase = PHASES[n % len(PHASES)]
        site.json("deploy", str(bundle), "--device", dev.id, "--reinstall")
        start = dev.target.console.mark()
        dev.check_for_update()
        if phase == "download":
            _wait_download(site, dev.id, rng.randrange(1, 95), 900)
        elif phase == "reboot":
            # The install ends, the boot configuration switches, the daemon reboots: cut anywhere in there.
            hit = dev.target.console.wait_for(r"reboot|Stopping|pitstop-grub", 900, start=start)
            time.sleep(rng.uniform(0, 4))
            start = hit.index
        else:
            hit = dev.target.console.wait_for(rf"pitstop-grub: booting slot {into}\b", 900, start=start)
            time.sleep(rng.uniform(0, 45))
            start = hit.index
        dev.target.power_cut()
        dev.target.timeline.rig("cut", f"cut {n + 1}/{power_cuts}: {phase}, updating {booted} -> {into}")
        mark = dev.target.console.mark()
        dev.target.power_on()
        up = dev.target.wait_ready(None, 900, start=mark)
        # Back on a good slot: the one it ran, or the new one when the cut came after the switch. Then the
        # update finishes: a retried install, a gate passed, or a failure reported; never left open.
        assert up[1] in (booted, into), up.text
        action = _finish(dev, site, into)
        final = dev.status()
        assert final["booted"] == final["primary"] and final["phase"] == "none", final
        good = {s["name"] for s in final["slots"] if s["content"] == "good"}
        assert final["booted"] in good, final
        if action["status"] == "success":
            assert final["booted"] == into, (action, final)
        dev.rig.figure("power_cut_survived", 1)


def _finish(dev: Device, site: SiteServer, into: str) -> dict[str, Any]:
    """Wait until the server's action is final. The daemon carries on by itself (a gate to pass, a result to
    report); an install the cut interrupted starts over at the next poll, which the rig asks for once a minute
    instead of waiting for the device's own schedule."""
    end = time.monotonic() + 1800
    asked = time.monotonic()
    while time.monotonic() < end:
        action = site.action(dev.id)
        assert action is not None
        if action["status"] in FINAL:
            dev.target.wait_ready(None, 600, start=max(0, dev.target.console.mark() - 200))
            return action
        if time.monotonic() - asked > 60:
            asked = time.monotonic()
            # Fails while it reboots (into the new slot, or back): the daemon's poll at its start does the same.
            with contextlib.suppress(AssertionError, HilError):
                dev.check_for_update()
        time.sleep(3)
    raise AssertionError(f"{dev.id}: the update to slot {into} never finished")
