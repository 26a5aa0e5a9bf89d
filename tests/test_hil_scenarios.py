"""The HIL rig's scenarios that belong in the default suite, run as the rig runs them: `pytest hil/ --target
qemu` in its own process (its own plugin, run directory, JUnit XML and report), here with `-m 'not slow'`
(the A→B update through `pitstop server`). The whole scenario suite: `./dev hil` (docs/hil.md)."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.root
@pytest.mark.vm
def test_hil_default_scenarios_on_a_qemu_device(tmp_path: Path) -> None:
    rig = tmp_path / "rig"
    log = tmp_path / "hil.log"
    cmd = [sys.executable, "-m", "pytest", "hil/scenarios", "--target", "qemu", "--rig-dir", str(rig),
           "-p", "no:cacheprovider", "-o", "addopts=-ra --strict-markers", "-m", "not slow"]  # fmt: skip
    with log.open("w") as out:
        rc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    text = log.read_text()
    report = rig / "report.md"
    assert rc == 0, f"{' '.join(cmd)} exited {rc}; report {report}\n{text[-6000:]}"
    suite = ET.parse(rig / "junit.xml").getroot()
    cases = suite.findall(".//testcase")
    skipped = [c.find("skipped") for c in cases if c.find("skipped") is not None]
    if cases and len(skipped) == len(cases):
        pytest.skip(f"every scenario skipped: {skipped[0].get('message') if skipped[0] is not None else ''}")
    assert len(cases) >= 1 and not skipped, text[-3000:]
    assert "reboot_to_serving_s" in report.read_text()
