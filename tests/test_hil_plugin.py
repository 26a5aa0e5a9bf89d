"""The HIL rig's pytest plugin (hil/plugin.py), run as a person runs it: pytest in a subprocess, on small scenario
files, against the local target (the rig host standing in for a device: a real console process, real hook
commands). And `pytest hil/` from the checkout: the plugin loads under the project's own pytest settings."""

from __future__ import annotations

import json
import random
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from pitstop.runner import Result, run

REPO = Path(__file__).resolve().parent.parent

SCENARIOS = """
import pytest


def test_update(target, rig, power_cuts, rng):
    target.power_on()
    target.wait_ready("a", 10)
    assert target.shell("echo hello") == (0, "hello\\n")
    target.network(False)
    for _ in range(power_cuts):
        target.power_cut()
        start = target.console.mark()
        target.power_on()
        target.wait_ready("a", 10, start=start)
    rig.figure("reboot_to_serving_s", 1.5, "s")
    rig.figure("reboot_to_serving_s", 2.5, "s")
    (rig.run_dir / "rng.txt").write_text(repr(rng.random()))


def test_broken(target):
    target.power_on()
    target.console.wait_for("PITSTOP-READY slot=b", 0.2)


@pytest.mark.hil(needs=["teleport"])
def test_needs_more(target):
    pass


def test_two_devices(target_factory):
    a, b = target_factory("a"), target_factory("b")
    a.power_on()
    b.power_on()
    a.wait_ready("a", 10)
    b.wait_ready("a", 10)
"""


def pytest_run(cwd: Path, *args: str) -> Result:
    return run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd, check=False, timeout=120)


def scenario_dir(tmp_path: Path) -> Path:
    d = tmp_path / "rig"
    d.mkdir()
    (d / "pytest.ini").write_text("[pytest]\naddopts = --strict-markers\n")
    (d / "conftest.py").write_text('pytest_plugins = ["pitstop.hil.plugin"]\n')
    (d / "test_scenarios.py").write_text(SCENARIOS)
    return d


def test_a_run_on_the_local_target(tmp_path: Path) -> None:
    d = scenario_dir(tmp_path)
    run_dir = tmp_path / "run"
    power = tmp_path / "power.log"
    res = pytest_run(
        d, "-q", "--target", "local", "--rig-dir", str(run_dir), "--seed", "7", "--power-cuts", "4",
        "--power-on", f"echo on >> {power}", "--power-off", f"echo off >> {power}",
    )  # fmt: skip
    out = res.text
    assert res.returncode == 1, out  # one scenario fails
    assert re.search(r"1 failed, 2 passed, 1 skipped", out), out
    assert f"HIL report: {run_dir / 'report.md'}" in out

    # JUnit XML in the run directory, since none was asked for.
    suite = ET.parse(run_dir / "junit.xml").getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("4", "1", "1")

    # The hooks ran: the first scenario's power-on, 4 cuts and power-ons, the teardown's cut; then the others.
    lines = power.read_text().split()
    assert lines[:10] == ["on"] + ["off", "on"] * 4 + ["off"]
    assert lines.count("on") == lines.count("off") == 1 + 4 + 1 + 2

    md = (run_dir / "report.md").read_text()
    assert "- target: local" in md and "- seed: 7" in md and "- power cuts per scenario: 4" in md
    assert "- result: 2 passed, 1 failed, 1 skipped" in md
    assert re.search(r"\| `test_scenarios.py::test_update` \| \*\*passed\*\* \| \d+\.\d s \| \[dut\]", md)
    assert re.search(
        r"\| `test_scenarios.py::test_broken` \| \*\*failed\*\* .*"
        r"ConsoleTimeout: dut: no /PITSTOP-READY slot=b/ within 0\.2 s",
        md,
    )
    assert "| `test_scenarios.py::test_needs_more` | **skipped** |" in md and "cannot do: teleport" in md
    assert "| reboot_to_serving_s | s | 2 | 1.5 | 2 | 2.5 |" in md
    assert "## Failures" in md and "ConsoleTimeout" in md

    data = json.loads((run_dir / "report.json").read_text())
    devices = {(d["test"].split("::")[1], d["name"]): d for d in data["devices"]}
    assert set(devices) == {
        ("test_update", "dut"), ("test_broken", "dut"), ("test_needs_more", "dut"), ("test_two_devices", "a"),
        ("test_two_devices", "b"),
    }  # fmt: skip
    update = [e["kind"] for e in devices[("test_update", "dut")]["timeline"]]
    assert update[:6] == ["power-on", "grub", "ready", "shell", "network-down", "power-cut"]
    assert update.count("power-cut") == 5 and update.count("ready") == 5
    # The failed scenario's device is in the report too, its serial log copied into the run directory.
    broken = devices[("test_broken", "dut")]
    log = run_dir / broken["files"]["serial log"]
    assert log.is_file() and "PITSTOP-READY slot=a" in log.read_text()
    assert [e["kind"] for e in broken["timeline"]][-1] == "power-cut"  # torn down
    # Random points can be replayed from the seed.
    want = random.Random("7:test_scenarios.py::test_update").random()
    assert (run_dir / "rng.txt").read_text() == repr(want)
    assert "<h2>Devices</h2>" in (run_dir / "report.html").read_text()
    assert not (tmp_path / "latest").exists()  # only out/hil/latest follows the default run directories


def test_junit_path_and_bad_options(tmp_path: Path) -> None:
    d = scenario_dir(tmp_path)
    res = pytest_run(
        d, "-q", "-k", "update", "--target", "local", "--rig-dir", str(tmp_path / "run"),
        "--junitxml", str(tmp_path / "mine.xml"),
    )  # fmt: skip
    assert res.returncode == 0, res.text
    assert (tmp_path / "mine.xml").is_file() and not (tmp_path / "run" / "junit.xml").exists()
    assert (tmp_path / "run" / "report.md").is_file()
    res = pytest_run(d, "-q", "-k", "update", "--target", "telnet://x", "--rig-dir", str(tmp_path / "run2"))
    assert res.returncode != 0 and "--target 'telnet://x': qemu, local or ssh://" in res.text + res.stderr.decode()
    res = pytest_run(
        d, "-q", "-k", "update", "--target", "local", "--power-on", "true", "--rig-dir", str(tmp_path / "run3")
    )
    assert res.returncode != 0 and "--power-on and --power-off go together" in res.text + res.stderr.decode()


def test_pytest_hil_from_the_checkout(tmp_path: Path) -> None:
    """`pytest hil/`: hil/conftest.py loads the plugin under pyproject.toml's settings (strict markers, its
    addopts); a collection alone leaves no run directory behind."""
    res = pytest_run(REPO, "hil/", "--help")
    assert res.returncode == 0, res.stderr.decode()
    for opt in ("--target", "--image", "--power-cuts", "--rig-dir", "--pdu-on", "--relay", "--net-down", "--console"):
        assert opt in res.text, opt
    res = pytest_run(REPO, "hil/", "--markers")
    assert "@pytest.mark.hil" in res.text
    before = set((REPO / "out" / "hil").glob("*")) if (REPO / "out" / "hil").is_dir() else set()
    res = pytest_run(REPO, "hil/", "--collect-only", "-q")
    assert res.returncode in (0, 5), res.text + res.stderr.decode()  # 5: no scenarios written yet
    after = set((REPO / "out" / "hil").glob("*")) if (REPO / "out" / "hil").is_dir() else set()
    assert after == before
