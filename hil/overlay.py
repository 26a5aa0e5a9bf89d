"""The rig's development hooks for an image: an extra overlay (`pitstop image build --extra-overlay`) applied
after the recipe's own, so the product recipe stays as it ships.

- A root shell on the serial console: agetty logs root in by itself, so the rig types commands there
  (hil/shell.py) without SSH keys, network or a password. Never put this in a product image.
"""

from __future__ import annotations

from pathlib import Path

from pitstop.hil.errors import HilError

# The console the kernel and GRUB use per architecture (recipes' boot.cmdline: console=ttyS0 on x86_64).
SERIAL_TTY = {"x86_64": "ttyS0", "aarch64": "ttyAMA0"}

AUTOLOGIN = """\
# pitstop HIL rig (hil/overlay.py): a root shell on the serial console. Development images only.
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 %I $TERM
"""


def autologin_dropin(tty: str) -> Path:
    """Where the drop-in lives inside the rootfs."""
    return Path("etc/systemd/system") / f"serial-getty@{tty}.service.d" / "autologin.conf"


def write_rig_overlay(dest: Path, *, arch: str = "x86_64") -> Path:
    """Write the rig's overlay tree into `dest` (made if missing) and return it."""
    tty = SERIAL_TTY.get(arch)
    if tty is None:
        raise HilError(f"no serial console known for {arch}")
    path = dest / autologin_dropin(tty)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(AUTOLOGIN)
    return dest
