"""The HIL rig's timelines (hil/timeline.py) and run report (hil/report.py), rendered from a synthetic run: tests
with every outcome, devices that really ran (local targets: a console, power actions, shell commands), figures."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from pitstop.hil import report as report_mod
from pitstop.hil.local_target import LocalTarget
from pitstop.hil.report import Report
from pitstop.hil.timeline import Clock, Timeline


def test_timeline_orders_and_stamps_events() -> None:
    clock = Clock(mono0=time.monotonic() - 10.0, wall0=1_700_000_000.0)
    tl = Timeline("dut", clock)
    late = tl.event("install-started", "pitstop install", url="http://10.0.2.2/b.pitb")
    early = tl.event("grub", "GRUB: booting slot a", source="console", t=2.5)
    assert tl.events == [early, late]  # a console line stamped earlier goes before
    assert late.t >= 10.0 and late.source == "scenario" and late.data == {"url": "http://10.0.2.2/b.pitb"}
    assert early.wall == 1_700_000_002.5
    assert early.as_json() == {
        "t": 2.5, "wall": 1_700_000_002.5, "kind": "grub", "text": "GRUB: booting slot a", "source": "console",
        "data": {},
    }  # fmt: skip
    seen: list[str] = []
    tl.subscribe(lambda e: seen.append(e.kind))
    tl.rig("power-cut")
    assert seen == ["power-cut"] and tl.last("power-cut") is not None and tl.events[-1].text == "power-cut"


def run_device(tmp_path: Path, name: str, clock: Clock, boot: str) -> LocalTarget:
    t = LocalTarget(name, tmp_path / name, boot_command=boot, clock=clock)
    t.power_on()
    t.console.wait_for("PITSTOP-READY|PITSTOP-BOOT-FAILED", 10)
    t.shell("echo '<b>status</b> | ok'")
    t.timeline.event("install-started", "scenario says: install <b.pitb>")
    t.power_cut()
    t.close()
    return t


def test_report_of_a_synthetic_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    run = tmp_path / "run"
    rep = Report(run, meta={"target": "local", "seed": "7"})
    good = run_device(
        tmp_path, "dut", clock, "echo 'pitstop-grub: booting slot a'; sleep 0.2; echo 'PITSTOP-READY slot=a'; exec cat"
    )
    bad = run_device(
        tmp_path, "dut", clock,
        "echo 'pitstop-grub: booting slot b'; echo 'Kernel panic - not syncing: <script>alert(1)</script>'; "
        "echo 'PITSTOP-BOOT-FAILED slot=b'; exec cat",
    )  # fmt: skip

    passed = rep.test("hil/test_update.py::test_a_to_b")
    rep.current = passed.nodeid
    rep.attach_device(good)
    for v in (41.2, 39.0, 45.5):
        rep.figure("reboot_to_serving_s", v, "s")
    passed.outcome, passed.duration = "passed", 52.25
    failed = rep.test("hil/test_rollback.py::test_broken_rootfs[1]")
    rep.current = failed.nodeid
    rep.attach_device(bad)
    rep.figure("boot_tries", 3)
    failed.outcome, failed.duration = "failed", 130.0
    failed.message = "AssertionError: wanted slot b | got a"
    failed.details = "E   AssertionError: wanted slot b | got a\n<details> ```"
    skipped = rep.test("hil/test_net.py::test_cut")
    skipped.outcome, skipped.message = "skipped", "target local cannot do: network"
    rep.current = None
    md_path = rep.write(final=True)

    md = md_path.read_text()
    assert md.startswith("# pitstop HIL run\n")
    assert "- target: local" in md and "- seed: 7" in md and "- result: 1 passed, 1 failed, 1 skipped" in md
    assert "| `hil/test_update.py::test_a_to_b` | **passed** | 52.2 s | [dut](#001-test_a_to_b-dut) |  |" in md
    assert "| `hil/test_rollback.py::test_broken_rootfs[1]` | **failed** |" in md
    assert "| **failed** | 130.0 s |" in md and "wanted slot b \\| got a" in md
    assert "\n````\nE   AssertionError: wanted slot b | got a\n<details> ```\n````\n" in md  # a longer fence
    assert "| `hil/test_net.py::test_cut` | **skipped** | 0.0 s |  | target local cannot do: network |" in md
    # Figures aggregated by name: count, min, median, max.
    assert "| reboot_to_serving_s | s | 3 | 39 | 41.2 | 45.5 |" in md
    assert "| boot_tries |  | 1 | 3 | 3 | 3 |" in md
    # Each device: its timeline in order, with the console's markers and the rig's actions.
    dut = md[md.index('<a id="001-test_a_to_b-dut">') : md.index('<a id="002-')]
    rows = [r for r in dut.splitlines() if re.match(r"\| \d+\.\d\d \|", r)]
    kinds = [r.split(" | ")[4] for r in rows]
    assert kinds == ["power-on", "grub", "ready", "shell", "install-started", "power-cut"]
    assert "| rig | power-on | power on |" in rows[0] and "| console | ready | PITSTOP-READY slot=a |" in rows[2]
    ready_delta = float(rows[2].split(" | ")[1].lstrip("+"))
    assert ready_delta >= 0.15  # the boot command slept 0.2 s between GRUB's line and READY
    assert "[serial log](devices/001-test_a_to_b-dut/serial.log)" in dut
    bad_md = md[md.index('<a id="002-') :]
    assert (
        "| console | panic | kernel panic: Kernel panic - not syncing: &lt;script&gt;alert(1)&lt;/script&gt; |"
        in bad_md
    )
    assert "| rig | shell | $ echo '&lt;b&gt;status&lt;/b&gt; \\| ok': exit 0 (" in bad_md
    assert "| console | panic |" in bad_md and "| console | boot-failed | PITSTOP-BOOT-FAILED slot=b |" in bad_md
    # The serial logs are copied into the run directory.
    log = (run / "devices" / "001-test_a_to_b-dut" / "serial.log").read_text()
    assert "PITSTOP-READY slot=a" in log and "### rig power-cut: power cut" in log

    page = (run / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "<script>alert" not in page and "<details>\n" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # in the embedded serial log and the timeline
    assert 'href="devices/002-test_broken_rootfs_1-dut/serial.log"' in page
    assert "<td class=failed>failed</td>" in page and "<td class=num>45.5</td>" in page
    assert "http://" not in page and "<link" not in page  # self-contained

    data = json.loads((run / "report.json").read_text())
    assert data["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert [f["value"] for f in data["figures"]["values"] if f["name"] == "reboot_to_serving_s"] == [41.2, 39.0, 45.5]
    assert {f["test"] for f in data["figures"]["values"]} == {passed.nodeid, failed.nodeid}
    dev = data["devices"][0]
    assert dev["test"] == passed.nodeid and dev["timeline"][0]["kind"] == "power-on"

    # A serial log larger than what the page embeds: its tail is embedded, the whole file linked.
    monkeypatch.setattr(report_mod, "_EMBED_LIMIT", 64)
    page = rep.render_html()
    assert "(last 0 KiB; the whole log is linked above)" in page
