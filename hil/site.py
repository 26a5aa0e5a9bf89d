"""What the rig's update scenarios stand on besides the target: the site update server (`pitstop server`, a
real process on the rig host), the update bundles pushed through it (made from the rig image's own rootfs),
and the device as the scenarios drive it (D-Bus calls and `pitstop status` through its root shell).

Everything goes through the server's management command line, as a site operator would use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import Any

from pitstop.hil.errors import HilError
from pitstop.hil.overlay import LOOP_DROPIN, LOOP_FPS, LOOP_NAME, MODEL_TARGET, rig_models
from pitstop.hil.plugin import Rig, RigImage
from pitstop.hil.target import Target
from pitstop.ota import devkeys
from pitstop.ota.bundle_format import FS_IMAGE_CHUNKING
from pitstop.ota.bundle_spec import BundleSpec, PayloadSpec
from pitstop.ota.bundle_writer import create_bundle
from pitstop.ota.signing import KeyFileSigner, Signer
from pitstop.runner import run

PITSTOP = [sys.executable, "-m", "pitstop.cli"]
BUS = "org.pitstop.Daemon1 /org/pitstop/Daemon1 org.pitstop.Daemon1"
# The device polls at most every 30 s (daemon/update_policy.py); the server says 30 s too.
POLL = "30s"


class SiteServer:
    """`pitstop server serve` as a child process on 127.0.0.1 (the QEMU device reaches it as 10.0.2.2), on the
    port the system picks (read from the first line it prints), with its own data directory and its log (stderr)
    in `log`. Devices are registered with `device add`, and provisioned with the token it prints, as at a site.

    The server's tests and benchmarks use it too, with their own `serve` arguments (`--keyring`, TLS, ...),
    environment (added to this process's) and pitstop command; `poll_interval` None leaves the server's default.
    `stop` ends it as an operator does (SIGTERM), `kill` as a crash does (SIGKILL), `restart` serves the same
    data directory again (on a new port)."""

    def __init__(
        self,
        data: Path,
        *serve_args: str,
        command: Sequence[str] = PITSTOP,
        verbose: bool = True,
        poll_interval: str | None = POLL,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        self.data = data
        self.command = list(command)
        self.argv = [*self.command, *(["-v"] if verbose else []), "server", "serve", "--data", str(data),
                     "--listen", "127.0.0.1:0", *(["--poll-interval", poll_interval] if poll_interval else []),
                     *serve_args]  # fmt: skip
        self.env = {**os.environ, **env} if env else None
        self.log = log or data.parent / f"{data.name}-serve.log"
        self.proc: subprocess.Popen[str] | None = None
        self.scheme = "http"
        self.port = 0

    def start(self) -> SiteServer:
        """Starts it; raises HilError, with its log, when it does not serve."""
        self.data.mkdir(parents=True, exist_ok=True)
        with self.log.open("a" if self.proc else "w") as log:  # a file, not a pipe: nobody reads it meanwhile
            self.proc = subprocess.Popen(
                self.argv, stdout=subprocess.PIPE, stderr=log, text=True, env=self.env, start_new_session=True
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r"listening on (https?)://127\.0\.0\.1:(\d+)", line)
        if m is None:
            self.stop()
            raise HilError(f"pitstop server did not start: {line!r}; log {self.log}:\n{self.log.read_text()}")
        self.scheme, self.port = m[1], int(m[2])
        return self

    def stop(self, timeout: float = 20) -> int:
        """Ends it as an operator does (SIGTERM), killed if it still runs after `timeout` s; its exit status."""
        assert self.proc is not None, "not started"
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        return self.kill()

    def kill(self) -> int:
        """Ends it as a crash does (SIGKILL to its process group), if it still runs; its exit status."""
        assert self.proc is not None, "not started"
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.wait()

    def restart(self) -> SiteServer:
        """Stops it if it runs, and starts it again on the same data directory (its log goes on)."""
        self.stop()
        return self.start()

    def __enter__(self) -> SiteServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self.proc is not None:
            self.stop()

    def url(self, host: str) -> str:
        return f"{self.scheme}://{host}:{self.port}"

    def cli(self, *args: str) -> str:
        return run([*self.command, "-q", "server", *args, "--data", str(self.data)]).text

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


# What makes the slow-inference rootfs slow: a drop-in after the rig's own (hil/overlay.py).
SLOW_DROPIN = LOOP_DROPIN.with_name("60-hil-slow-inference.toml")
SLOW_LOOP = f"""\
# pitstop HIL rig: this rootfs's inference delivers a quarter of the rig's pace (a regression the gate catches).
[[loop]]
name = "{LOOP_NAME}"
source_opts = {{ width = 256, height = 256, fps = {LOOP_FPS / 4} }}
"""


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
            # The image's own chunking: the device's recorded index then seeds a delta install.
            spec = BundleSpec(version, security_version, self.compatible, (payload,), created=self.when,
                              chunking=FS_IMAGE_CHUNKING)
            create_bundle(spec, out.with_suffix(".tmp"), signer)
            out.with_suffix(".tmp").rename(out)
        return out

    def good(self) -> Path:
        """The image's rootfs again, as the next minor version with the next security version."""
        return self.make("good.pitb", self.version(1), self.security_version + 1, self.rootfs, self.signer)

    def make_model(self, name: str, version: str, model: Path, description: dict[str, Any]) -> Path:
        out = self.work / name
        if not out.is_file():
            payload = PayloadSpec(LOOP_NAME, "model", model, MODEL_TARGET, description)
            spec = BundleSpec(version, self.security_version, self.compatible, (payload,), created=self.when)
            create_bundle(spec, out.with_suffix(".tmp"), self.signer)
            out.with_suffix(".tmp").rename(out)
        return out

    def model_bundle(self, name: str, version: str, *, broken: bool) -> Path:
        """The rig's model (hil/overlay.py) as a model payload, whole or cut in half, under its own file name
        (the loop's configured path)."""
        found = rig_models()[0]
        assert found.description_file is not None
        model = found.source
        if broken:
            model = self.work / "broken-model" / found.source.name
            model.parent.mkdir(exist_ok=True)
            data = found.source.read_bytes()
            model.write_bytes(data[: len(data) // 2])
        return self.make_model(name, version, model, tomllib.loads(found.description_file.read_text()))

    def edited_rootfs(self, name: str, commands: str, check: str, expect: str) -> Path:
        """A copy of the image's rootfs changed by `commands` (debugfs, run from its root), checked by reading
        `check` back (debugfs `stat` or `cat`): its output must contain `expect`. Cached as `<name>.ext4`."""
        out = self.work / f"{name}.ext4"
        if out.is_file():
            return out
        tmp = out.with_suffix(".tmp")
        run(["cp", "--sparse=always", str(self.rootfs), str(tmp)])
        cmds = self.work / f"{name}.debugfs"
        cmds.write_text(commands)
        run(["debugfs", "-w", "-f", str(cmds), str(tmp)])
        # debugfs reports a failed command on stdout and exits 0: read the result back instead.
        if expect not in run(["debugfs", "-R", check, str(tmp)]).text:
            raise HilError(f"{name}: debugfs did not change {tmp} as asked ({check!r} lacks {expect!r})")
        run(["e2fsck", "-fn", str(tmp)])
        tmp.rename(out)
        return out

    def slow_rootfs(self) -> Path:
        """The image's rootfs with one more daemon drop-in: the rig's loop paced at a quarter of its rate."""
        dropin = self.work / SLOW_DROPIN.name
        dropin.write_text(SLOW_LOOP)
        cmds = f"cd /{SLOW_DROPIN.parent}\nwrite {dropin} {SLOW_DROPIN.name}\n"
        return self.edited_rootfs("slow-inference", cmds, f"cat /{SLOW_DROPIN}", SLOW_LOOP)

    def emergency_rootfs(self) -> Path:
        """The image's rootfs booting into emergency mode (its default target is emergency.target), as one
        whose fstab or early units fail does: the kernel runs, systemd runs, the daemon never does."""
        link = "/etc/systemd/system/default.target"
        cmds = f"rm {link}\nsymlink {link} /usr/lib/systemd/system/emergency.target\n"
        return self.edited_rootfs("emergency", cmds, f"stat {link}", "emergency.target")

    def no_init(self) -> Path:
        broken = self.work / "no-init.ext4"
        return broken if broken.is_file() else no_boot_rootfs(self.rootfs, self.work)

    def foreign_signer(self) -> Signer:
        """A development PKI the device's keyring does not know."""
        d = self.work / "other-keys"
        if not d.is_dir():
            devkeys.write_dev_pki(devkeys.make_dev_pki("ecdsa-p256"), d)
        return KeyFileSigner.load(d / "signing.key", [d / "chain.pem"])


class Updates:
    """Bundles for the scenarios, for the rig image's product (`compatible`), each made on first use (a scenario
    that needs one bundle waits for that one only) and cached with the image."""

    def __init__(self, maker: BundleMaker) -> None:
        self.maker = maker
        self.work = maker.work
        self.good_version = maker.version(1)
        self.model_version = maker.version(3)

    @cached_property
    def good(self) -> Path:
        """The image's rootfs again, as the next minor version with the next security version."""
        return self.maker.good()

    @cached_property
    def no_boot(self) -> Path:
        """A rootfs with a kernel and an initramfs but no init: the kernel panics, panic=5 resets."""
        b = self.maker
        return b.make("no-boot.pitb", b.version(1, 1), b.security_version + 1, b.no_init(), b.signer)

    @cached_property
    def slow_inference(self) -> Path:
        """A rootfs that boots and runs everything, but whose inference loop delivers a quarter of its pace: it
        fails the health gate's throughput check against the baseline measured before the update."""
        b = self.maker
        return b.make("slow-inference.pitb", b.version(1, 2), b.security_version + 1, b.slow_rootfs(), b.signer)

    @cached_property
    def emergency(self) -> Path:
        """A rootfs whose userspace ends in emergency mode: the image's emergency drop-in reboots after a pause,
        each boot spends a try, GRUB falls back."""
        b = self.maker
        return b.make("emergency.pitb", b.version(1, 3), b.security_version + 1, b.emergency_rootfs(), b.signer)

    @cached_property
    def unsigned(self) -> Path:
        b = self.maker
        return b.make("unsigned.pitb", b.version(2, 0), b.security_version + 1, b.no_init(), None)

    @cached_property
    def wrong_key(self) -> Path:
        """Signed by a key the device's keyring does not know."""
        b = self.maker
        return b.make("wrong-key.pitb", b.version(2, 1), b.security_version + 1, b.no_init(), b.foreign_signer())

    @cached_property
    def downgrade(self) -> Path:
        """Signed well, a security version below the one the device committed."""
        b = self.maker
        if b.security_version < 1:
            raise HilError("the image's security version is 0: no downgrade below it can be made")
        return b.make("downgrade.pitb", b.version(2, 2), b.security_version - 1, b.no_init(), b.signer)

    @cached_property
    def model(self) -> Path:
        """A model-only bundle: the rig's model again, as a new version (its loop restarts on it, no reboot)."""
        return self.maker.model_bundle("model.pitb", self.model_version, broken=False)

    @cached_property
    def broken_model(self) -> Path:
        """A model-only bundle whose model file is cut short (a failed export): the loop cannot load it."""
        return self.maker.model_bundle("broken-model.pitb", self.maker.version(3, 1), broken=True)


def make_updates(rig_image: RigImage, work: Path) -> Updates:
    """The scenarios' bundles for `rig_image`, made under `work` as they are asked for."""
    return Updates(BundleMaker(rig_image, work))


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
        self.shell(f"busctl call {BUS} CheckForUpdate", 120)

    def status(self) -> dict[str, Any]:
        out = self.shell("pitstop status --json", 60)
        doc: dict[str, Any] = json.loads(out[out.index("{") : out.rindex("}") + 1])
        return doc

    def slots(self) -> str:
        """`a:good b:empty`, booted slot first."""
        st = self.status()
        return " ".join(f"{s['name']}:{s['content']}" for s in sorted(st["slots"], key=lambda s: not s["booted"]))

    def reboot_marks(self, slot: str, timeout: float, *, start: int) -> tuple[float, float]:
        """Wait for GRUB to boot `slot`, its inference loop to serve and the daemon to commit it: (time GRUB booted
        it, time it was committed). Figures: reboot_to_serving_s (GRUB to the loop's first results in the new
        slot) and reboot_to_committed_s (GRUB to the commit, after the health gate)."""
        grub = self.target.console.wait_for(rf"pitstop-grub: booting slot {slot}\b", timeout, start=start)
        serving = self.target.wait_serving(LOOP_NAME, 600, start=grub.index)
        self.rig.figure("reboot_to_serving_s", serving.t - grub.t, "s")
        ready = self.target.wait_ready(slot, 600, start=grub.index)
        self.rig.figure("reboot_to_committed_s", ready.t - grub.t, "s")
        return grub.t, ready.t

    def shell(self, command: str, timeout: float = 60) -> str:
        """`command`'s output through the device's root shell; an AssertionError when it exits non-zero."""
        rc, out = self.target.shell(command, timeout)
        assert rc == 0, f"{command}: exit {rc}: {out}"
        return out

    def model_version(self) -> str:
        """The live version directory of the rig's model (the link's target's name)."""
        return self.shell(f"basename $(readlink /data/{MODEL_TARGET})").strip().splitlines()[-1]

    def wait_loop_fps(self, fps: float, timeout: float) -> dict[str, Any]:
        """The rig's loop once it runs at `fps` or more (over its run, as the update agent's baseline takes it)."""
        end = time.monotonic() + timeout
        while True:
            lp = self.loop()
            if lp["state"] == "running" and (lp["fps"] or 0) >= fps:
                return lp
            if time.monotonic() > end:
                raise AssertionError(f"{self.id}: loop {LOOP_NAME} not at {fps} results/s within {timeout:.0f} s: {lp}")
            time.sleep(15)  # `pitstop status` takes seconds of the emulated CPU the loop runs on

    def loop(self) -> dict[str, Any]:
        """The rig's loop as `pitstop status --json` shows it (state, fps, restarts, cause)."""
        found: dict[str, Any] = next(lp for lp in self.status()["daemon"]["loops"] if lp["name"] == LOOP_NAME)
        return found
