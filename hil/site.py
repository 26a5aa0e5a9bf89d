"""What the rig's update scenarios stand on besides the target: the site update server (`pitstop server`, a
real process on the rig host), the update bundles pushed through it (made from the rig image's own rootfs),
and the device as the scenarios drive it (D-Bus calls and `pitstop status` through its root shell).

Everything goes through the server's management command line, as a site operator would use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from pitstop.hil.errors import HilError
from pitstop.hil.plugin import Rig, RigImage
from pitstop.hil.target import Target
from pitstop.ota import devkeys
from pitstop.ota.bundle_spec import BundleSpec, PayloadSpec
from pitstop.ota.bundle_writer import create_bundle
from pitstop.ota.signing import KeyFileSigner, Signer
from pitstop.runner import run

PITSTOP = [sys.executable, "-m", "pitstop.cli"]
BUS = "org.pitstop.Daemon1 /org/pitstop/Daemon1 org.pitstop.Daemon1"
# The device polls at most every 30 s (daemon/update_policy.py); the server says 30 s too.
POLL = "30s"


class SiteServer:
    """`pitstop server serve` on 127.0.0.1 (the QEMU device reaches it as 10.0.2.2) with its own data directory.
    Devices are registered with `device add`, and provisioned with the token it prints, as at a site."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.log = data.parent / f"{data.name}-serve.log"

    def __enter__(self) -> SiteServer:
        self.data.mkdir(parents=True, exist_ok=True)
        log = self.log.open("w")
        self.proc = subprocess.Popen(
            [*PITSTOP, "-v", "server", "serve", "--data", str(self.data), "--listen", "127.0.0.1:0",
             "--poll-interval", POLL],
            stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r"listening on https?://127\.0\.0\.1:(\d+)", line)
        if m is None:
            self.__exit__(None, None, None)
            raise AssertionError(f"pitstop server did not start: {line!r}; log {self.log}:\n{self.log.read_text()}")
        self.port = int(m[1])
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()

    def url(self, host: str) -> str:
        return f"http://{host}:{self.port}"

    def cli(self, *args: str) -> str:
        return run([*PITSTOP, "-q", "server", *args, "--data", str(self.data)]).text

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json"))

    def add_device(self, device: str) -> str:
        """Registers `device`; its token."""
        return self.cli("device", "add", device).strip().splitlines()[-1].split()[-1]

    def upload(self, bundle: Path) -> int:
        return int(self.json("upload", str(bundle))["id"])

    def deploy(self, bundle: int, device: str) -> str:
        """A rollout of `bundle` to `device` alone; its id (`r3`)."""
        return str(self.json("deploy", str(bundle), "--device", device)["rollout"])

    def device(self, device: str) -> dict[str, Any]:
        doc: dict[str, Any] = self.json("device", "show", device)
        return doc

    def action(self, device: str) -> dict[str, Any] | None:
        """The device's current or last action, with its history (every feedback, oldest first)."""
        doc = self.device(device)
        current = doc.get("deployment")
        if current is None:
            return None
        found: dict[str, Any] = next(a for a in doc["actions"] if a["action"] == current["action"])
        return found

    def wait_action(self, device: str, statuses: set[str], timeout: float) -> dict[str, Any]:
        """The device's action once its status is one of `statuses`."""
        end = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while time.monotonic() < end:
            last = self.action(device)
            if last is not None and last["status"] in statuses:
                return last
            time.sleep(2)
        raise AssertionError(f"{device}: no action in {sorted(statuses)} within {timeout:.0f} s; last: {last}")

    def wait_device(self, device: str, ok: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """`device show --json` once `ok` holds for it."""
        end = time.monotonic() + timeout
        while True:
            doc = self.device(device)
            if ok(doc):
                return doc
            if time.monotonic() > end:
                raise AssertionError(f"{device}: not as expected within {timeout:.0f} s: {doc}")
            time.sleep(2)

    @staticmethod
    def details(action: dict[str, Any]) -> str:
        """Everything the device said about an action, one line per feedback."""
        return "\n".join(f"{e['execution']} {e['finished']}: {'; '.join(e['details'])}" for e in action["history"])


# --- bundles ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Updates:
    """Bundles for the scenarios, for the rig image's product (`compatible`)."""

    good: Path  # the image's rootfs again, as a newer version with a higher security version
    good_version: str
    no_boot: Path  # a rootfs with a kernel and an initramfs but no init: the kernel panics, panic=5 resets
    unsigned: Path
    wrong_key: Path  # signed by a key the device's keyring does not know
    downgrade: Path  # signed well, a security version below the one the device committed
    work: Path  # where they were made (with the foreign key and the no-init rootfs)


def rootfs_of(image_manifest: dict[str, Any], disk: Path) -> Path:
    return disk.parent / str(image_manifest["artifacts"]["rootfs"]["file"])


def no_boot_rootfs(rootfs: Path, work: Path) -> Path:
    """A slot that GRUB loads and the kernel starts, whose root has no init: the initramfs gives up and, with
    `panic=5` on the command line, resets the machine. Made from the image's own kernel and initramfs."""
    tree = work / "no-init"
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "boot").mkdir(parents=True)
    listing = run(["debugfs", "-R", "ls -p /boot", str(rootfs)]).text
    names = [f.split("/")[5] for f in listing.splitlines() if f.count("/") >= 6]
    for n in names:
        if n.startswith(("vmlinuz-", "initrd.img-")):
            run(["debugfs", "-R", f"dump /boot/{n} {tree / 'boot' / n}", str(rootfs)])
    kernel = next(n for n in names if n.startswith("vmlinuz-"))
    (tree / "vmlinuz").symlink_to(f"boot/{kernel}")
    (tree / "initrd.img").symlink_to(f"boot/initrd.img-{kernel.removeprefix('vmlinuz-')}")
    out = work / "no-init.ext4"
    out.unlink(missing_ok=True)
    size = sum(p.stat().st_size for p in (tree / "boot").iterdir()) + (16 << 20)
    run(["mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", str(tree), str(out), f"{size // 1024}k"])
    return out


class BundleMaker:
    """Bundles for the rig image's product (its `compatible`), signed with the keys that signed the image,
    made once per image (cached under `work`, keyed by the image's first bundle)."""

    def __init__(self, rig_image: RigImage, work: Path) -> None:
        if rig_image.keys is None or rig_image.bundle is None:
            raise HilError(f"{rig_image.disk}: no first bundle or development keys beside it (its build manifest)")
        st = rig_image.bundle.stat()
        self.work = work / hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        self.work.mkdir(parents=True, exist_ok=True)
        m = rig_image.manifest
        self.compatible = str(m["recipe"]["compatible"])
        self.security_version = int(m["recipe"]["security_version"])  # what the factory state commits
        major, minor, _ = (int(x) for x in str(m["recipe"]["version"]).split("-", maxsplit=1)[0].split("."))
        self.major, self.minor = major, minor
        self.rootfs = rootfs_of(m, rig_image.disk)
        self.signer = KeyFileSigner.load(rig_image.keys / "signing.key", [rig_image.keys / "chain.pem"])
        self.when = datetime.now(UTC).replace(microsecond=0)

    def version(self, minor: int, patch: int = 0) -> str:
        return f"{self.major}.{self.minor + minor}.{patch}"

    def make(self, name: str, version: str, security_version: int, rootfs: Path, signer: Signer | None) -> Path:
        out = self.work / name
        if not out.is_file():
            payload = PayloadSpec("rootfs", "rootfs", rootfs, "rootfs")
            spec = BundleSpec(version, security_version, self.compatible, (payload,), created=self.when)
            create_bundle(spec, out.with_suffix(".tmp"), signer)
            out.with_suffix(".tmp").rename(out)
        return out

    def good(self) -> Path:
        """The image's rootfs again, as the next minor version with the next security version."""
        return self.make("good.pitb", self.version(1), self.security_version + 1, self.rootfs, self.signer)

    def no_init(self) -> Path:
        broken = self.work / "no-init.ext4"
        return broken if broken.is_file() else no_boot_rootfs(self.rootfs, self.work)

    def foreign_signer(self) -> Signer:
        """A development PKI the device's keyring does not know."""
        d = self.work / "other-keys"
        if not d.is_dir():
            devkeys.write_dev_pki(devkeys.make_dev_pki("ecdsa-p256"), d)
        return KeyFileSigner.load(d / "signing.key", [d / "chain.pem"])


def make_updates(rig_image: RigImage, work: Path) -> Updates:
    """Every bundle the scenarios use."""
    b = BundleMaker(rig_image, work)
    sv = b.security_version
    if sv < 1:
        raise HilError("the image's security version is 0: no downgrade below it can be made")
    broken = b.no_init()
    return Updates(
        good=b.good(),
        good_version=b.version(1),
        no_boot=b.make("no-boot.pitb", b.version(1, 1), sv + 1, broken, b.signer),
        unsigned=b.make("unsigned.pitb", b.version(2, 0), sv + 1, broken, None),
        wrong_key=b.make("wrong-key.pitb", b.version(2, 1), sv + 1, broken, b.foreign_signer()),
        downgrade=b.make("downgrade.pitb", b.version(2, 2), sv - 1, broken, b.signer),
        work=b.work,
    )


# --- the device ------------------------------------------------------------------------------------------------


@dataclass
class Device:
    """The device under test as the scenarios drive it: its target, its id at the site server."""

    target: Target
    site: SiteServer
    id: str
    rig: Rig

    def check_for_update(self) -> None:
        """CheckForUpdate over D-Bus: the poll an operator asks for, instead of waiting up to 33 s for the next."""
        rc, out = self.target.shell(f"busctl call {BUS} CheckForUpdate", 120)
        assert rc == 0, out

    def status(self) -> dict[str, Any]:
        rc, out = self.target.shell("pitstop status --json", 60)
        assert rc == 0, out
        doc: dict[str, Any] = json.loads(out[out.index("{") : out.rindex("}") + 1])
        return doc

    def slots(self) -> str:
        """`a:good b:empty`, booted slot first."""
        st = self.status()
        return " ".join(f"{s['name']}:{s['content']}" for s in sorted(st["slots"], key=lambda s: not s["booted"]))

    def reboot_marks(self, slot: str, timeout: float, *, start: int) -> tuple[float, float]:
        """Wait for GRUB to boot `slot` and the daemon to commit it: (time GRUB booted it, time it was ready)."""
        grub = self.target.console.wait_for(rf"pitstop-grub: booting slot {slot}\b", timeout, start=start)
        ready = self.target.wait_ready(slot, 600, start=grub.index)
        self.rig.figure("reboot_to_serving_s", ready.t - grub.t, "s")
        return grub.t, ready.t
