"""The files image/rootfs.py writes into the root filesystem for systemd's emergency and rescue mode: drop-ins that
replace the login shell nobody can use (root is locked, nobody is at the console) with a console line and a reboot,
after `boot.emergency_reboot_s`; none when it is 0. Written into a plain directory (`configure_tree`), checked
against Debian 12's units with `systemd-analyze verify`, and the script run under /bin/sh with stand-ins for
systemctl, sleep and reboot."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from imagekit import RECIPE, write_recipe

from pitstop.image import recipe, rootfs

UNITS = Path("/usr/lib/systemd/system")
SCRIPT = "usr/lib/pitstop/emergency-reboot"


def dropin(unit: str) -> str:
    return f"usr/lib/systemd/system/{unit}.service.d/50-pitstop-reboot.conf"


def configured(tmp_path: Path, boot_line: str | None) -> Path:
    """A tree configured from the test recipe, with `boot_line` added to its [boot] table."""
    text = RECIPE if boot_line is None else RECIPE.replace("tries = 3\n", f"tries = 3\n{boot_line}\n")
    r = recipe.load(write_recipe(tmp_path / "recipe", text))
    tree = tmp_path / "tree"
    tree.mkdir()
    rootfs.configure_tree(r, tree, keyring_pem=(tmp_path / "recipe" / "keyring.pem").read_bytes())
    return tree


def test_dropins_carry_the_configured_delay(tmp_path: Path) -> None:
    tree = configured(tmp_path, "emergency_reboot_s = 45")
    for unit in ("emergency", "rescue"):
        text = (tree / dropin(unit)).read_text()
        settings = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
        # ExecStart reset first: a second ExecStart= would make the unit invalid (Type=idle, not oneshot).
        assert settings == [
            "[Service]",
            "ExecStart=",
            f"ExecStart=-/usr/lib/pitstop/emergency-reboot {unit} 45",
            "StandardInput=null",
            "StandardOutput=tty",
            "TTYPath=/dev/console",
        ]
        assert (tree / dropin(unit)).stat().st_mode & 0o777 == 0o644
    script = tree / SCRIPT
    assert script.stat().st_mode & 0o777 == 0o755
    assert script.read_text().startswith("#!/bin/sh\n")
    # The vendor directory, so that an /etc drop-in (an overlay's) can still override or replace them.
    assert not (tree / "etc/systemd/system/emergency.service.d").exists()


def test_default_delay_is_30_s(tmp_path: Path) -> None:
    tree = configured(tmp_path, None)
    assert "ExecStart=-/usr/lib/pitstop/emergency-reboot emergency 30\n" in (tree / dropin("emergency")).read_text()


def test_zero_keeps_systemds_shell(tmp_path: Path) -> None:
    tree = configured(tmp_path, "emergency_reboot_s = 0")
    assert not (tree / "usr/lib/systemd/system/emergency.service.d").exists()
    assert not (tree / "usr/lib/systemd/system/rescue.service.d").exists()
    assert not (tree / "usr/lib/pitstop").exists()


def test_files_depend_only_on_the_recipe(tmp_path: Path) -> None:
    """Two recipes in different places with the same settings give the same files; the delay changes only the
    drop-ins (the script is the same for every recipe)."""
    one = rootfs.emergency_files(recipe.load(write_recipe(tmp_path / "one")))
    two = rootfs.emergency_files(recipe.load(write_recipe(tmp_path / "two")))
    assert one == two
    text = RECIPE.replace("tries = 3\n", "tries = 3\nemergency_reboot_s = 600\n")
    longer = rootfs.emergency_files(recipe.load(write_recipe(tmp_path / "three", text)))
    changed = sorted(p for p in one if one[p] != longer[p])
    assert changed == ["/" + dropin("emergency"), "/" + dropin("rescue")]


def test_units_with_the_dropins_verify(tmp_path: Path) -> None:
    """Debian 12's emergency.service and rescue.service (systemd 252) with the drop-ins pass `systemd-analyze
    verify` without a word; without the ExecStart= reset they would not (checked too, so the check checks)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None or not all((UNITS / f"{u}.service").is_file() for u in ("emergency", "rescue")):
        pytest.skip("needs systemd-analyze and systemd's emergency.service and rescue.service (Debian: systemd)")
    tree = configured(tmp_path, "emergency_reboot_s = 20")
    for unit in ("emergency", "rescue"):
        shutil.copy(UNITS / f"{unit}.service", tree / "usr/lib/systemd/system")

    def verify() -> subprocess.CompletedProcess[str]:
        argv = [analyze, "verify", f"--root={tree}", "emergency.service", "rescue.service"]
        return subprocess.run(argv, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)

    res = verify()
    assert (res.returncode, res.stdout + res.stderr) == (0, "")
    broken = tree / dropin("rescue")
    broken.write_text(broken.read_text().replace("ExecStart=\n", ""))
    res = verify()
    assert res.returncode != 0 and "more than one ExecStart=" in res.stderr


STUB = """\
#!/bin/sh
echo "$(basename "$0") $*" >> "$LOG"
case "$1" in
list-units) printf '%s\\n' "data.mount loaded failed failed /data" $FAILED ;;
--force) exit "$REBOOT_RC" ;;
esac
"""


def run_script(tmp_path: Path, *, failed: str, reboot_rc: int) -> tuple[str, list[str]]:
    """The script as the drop-in runs it (`emergency-reboot emergency 30`), systemctl, sleep and reboot replaced by
    stand-ins that log their arguments. Returns (its output, the commands it ran)."""
    tree = configured(tmp_path, None)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("systemctl", "sleep", "reboot"):
        (stubs / name).write_text(STUB)
        os.chmod(stubs / name, 0o755)
    log = tmp_path / "log"
    env = {
        "PATH": f"{stubs}:/usr/bin:/bin",
        "LOG": str(log),
        "FAILED": failed,
        "REBOOT_RC": str(reboot_rc),
    }
    res = subprocess.run(
        ["/bin/sh", tree / SCRIPT, "emergency", "30"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )
    assert res.stderr == ""
    return res.stdout, log.read_text().splitlines()


def test_script_says_why_waits_and_reboots(tmp_path: Path) -> None:
    out, ran = run_script(tmp_path, failed="", reboot_rc=0)
    assert out.splitlines()[0] == (
        "pitstop: emergency mode (failed: data.mount); rebooting in 30 s: "
        "a slot on trial falls back once its tries are spent"
    )
    # systemd took the reboot: the script only waits to be killed; still alive a minute later, it reboots itself.
    assert ran == [
        "systemctl list-units --state=failed --plain --no-legend --no-pager",
        "sleep 30",
        "systemctl --force reboot",
        "sleep 60",
        "reboot -f",
    ]


def test_script_reboots_itself_when_systemd_cannot_be_asked(tmp_path: Path) -> None:
    out, ran = run_script(tmp_path, failed="a.service b.mount c.service d.service", reboot_rc=1)
    assert "(failed: data.mount a.service b.mount and 2 more)" in out.splitlines()[0]
    assert out.splitlines()[1] == "pitstop: systemd did not reboot; reboot -f"
    assert ran[-3:] == ["sleep 30", "systemctl --force reboot", "reboot -f"]
