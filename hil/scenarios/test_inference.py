"""The scenarios of updates judged by inference: the health gate compares the rig's loop (hil/overlay.py: the
orientation classifier on synthetic frames at a fixed pace) after an update with its throughput before.

Both are marked slow: `pytest hil/ -m ''` runs them with the rest (docs/hil.md).
"""

from __future__ import annotations

import pytest

from pitstop.hil.overlay import LOOP_FPS, LOOP_NAME
from pitstop.hil.site import Device, SiteServer, Updates

FINAL = {"success", "failure", "canceled"}
BASELINE = LOOP_FPS * 0.9  # what the loop runs at before an update is deployed: the gate's baseline


@pytest.mark.slow
def test_failing_inference_gate_rolls_back_and_is_reported(device: Device, site: SiteServer, updates: Updates) -> None:
    """A signed rootfs that boots and runs, but whose loop delivers a quarter of its throughput before the update:
    the gate fails at its deadline in slot b, the daemon marks b bad and reboots into a, and reports from a why,
    with the loop's figures; a serves inference again."""
    dev = device
    dev.wait_loop_fps(BASELINE, 120)
    site.deploy(site.upload(updates.slow_inference), dev.id)
    start = dev.target.console.mark()
    dev.check_for_update()
    into_b = dev.target.console.wait_for(r"pitstop-grub: booting slot b\b", 1200, start=start)
    # b runs its loop (slowly): the gate has something to measure, and it is not enough.
    dev.target.wait_serving(LOOP_NAME, 600, start=into_b.index)
    back = dev.target.console.wait_for(r"pitstop-grub: booting slot a\b", 900, start=into_b.index)
    dev.target.timeline.rig("rollback", f"GRUB back on a {back.t - into_b.t:.0f} s after it booted b")
    dev.target.wait_ready("a", 600, start=back.index)
    dev.target.wait_serving(LOOP_NAME, 600, start=back.index)
    action = site.wait_action(dev.id, FINAL, 300)
    text = site.details(action)
    assert action["status"] == "failure", text
    assert "health gate" in text.lower() or "not healthy" in text, text
    assert f"loop {LOOP_NAME}:" in text and "needs" in text, text
    st = dev.status()
    assert st["booted"] == "a" and st["primary"] == "a" and st["phase"] == "none", st
    assert {s["name"]: s["content"] for s in st["slots"]}["b"] == "bad", st
    assert st["committed_security_version"] == updates.maker.security_version, st
    dev.rig.figure("gate_rollback_s", back.t - into_b.t, "s")


@pytest.mark.slow
def test_model_update_and_its_rollback(device: Device, site: SiteServer, updates: Updates) -> None:
    """A model-only bundle goes live without a reboot: the loop restarts on the new version, passes the gate, the
    update is committed. Then a model that cannot load: the gate fails, the model's link goes back to the
    version before, the loop serves on it again, and the failure is reported. The rootfs slot never changes."""
    dev = device
    before = dev.status()
    first = dev.model_version()
    dev.wait_loop_fps(BASELINE, 120)

    site.deploy(site.upload(updates.model), dev.id)
    start = dev.target.console.mark()
    asked = dev.rig.clock.now()
    dev.check_for_update()
    action = site.wait_action(dev.id, FINAL, 600)
    assert action["status"] == "success", site.details(action)
    served = dev.target.wait_serving(LOOP_NAME, 60, start=start)
    new = dev.model_version()
    assert new != first and new.startswith(f"{updates.model_version}-"), (first, new)
    st = dev.status()
    assert st["payloads"]["models/orientation"]["current"] == new, st
    assert st["payloads"]["models/orientation"]["previous"] == first, st
    dev.target.timeline.rig("model", f"{updates.model.name}: live as {new}")
    dev.rig.figure("model_poll_to_serving_s", served.t - asked, "s")  # download, install, the loop's restart

    dev.wait_loop_fps(BASELINE, 120)
    site.deploy(site.upload(updates.broken_model), dev.id)
    start = dev.target.console.mark()
    dev.check_for_update()
    action = site.wait_action(dev.id, FINAL, 900)
    text = site.details(action)
    assert action["status"] == "failure", text
    assert f"loop {LOOP_NAME}" in text, text
    assert dev.model_version() == new, "the model's link went back to the version before"
    dev.target.wait_serving(LOOP_NAME, 120, start=start)
    dev.wait_loop_fps(BASELINE, 120)
    after = dev.status()
    assert after["payloads"]["models/orientation"]["current"] == new, after
    assert after["booted"] == before["booted"] == "a" and after["slots"] == before["slots"], (before, after)
    assert "pitstop-grub: booting" not in dev.target.console.text(start), "a model-only update never reboots"
