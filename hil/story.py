"""The whole story on one machine (`./dev setup` ends with it; `python -m pitstop.hil.story` alone): the image
`./dev image` built, flashed to a QEMU virtual device and provisioned for a site server on this machine;
an update pushed through the server; the device taking it, switching slots, committing it, and reporting its
health; the server's view of the device at the end.

Nothing is typed on the device: it is provisioned with the server's address and its token, the deployment
waits on the server before the device's first boot, and the daemon's first poll finds it.

Usage:  python -m pitstop.hil.story [--image out/image/ipc-x86_64.img] [--work out/story] [--accel auto]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pitstop.errors import PitstopError
from pitstop.hil.errors import ConsoleTimeout
from pitstop.hil.plugin import image_beside
from pitstop.hil.qemu_target import QemuConfig, QemuTarget
from pitstop.hil.site import BundleMaker, SiteServer
from pitstop.hil.target import Provision, rig_factory_ca

REPO = Path(__file__).resolve().parent.parent
DEVICE = "story-0001"


def say(text: str) -> None:
    print(f"story: {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pitstop.hil.story", description=__doc__.splitlines()[0])
    ap.add_argument("--image", type=Path, default=Path("out/image/ipc-x86_64.img"))
    ap.add_argument("--work", type=Path, default=Path("out/story"))
    ap.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    args = ap.parse_args(argv)
    try:
        return story(args.image.absolute(), args.work.absolute(), {"auto": None, "kvm": True, "tcg": False}[args.accel])
    except PitstopError as e:
        sys.stderr.write(f"story: error: {e.message}\n")
        return e.exit_code
    except AssertionError as e:
        sys.stderr.write(f"story: failed: {e}\n")
        return 1


def story(image: Path, work: Path, kvm: bool | None) -> int:
    img = image_beside(image)
    work.mkdir(parents=True, exist_ok=True)
    # A story starts from a new server and a new device (the bundle made last time is kept).
    shutil.rmtree(work / "site", ignore_errors=True)
    shutil.rmtree(work / "device", ignore_errors=True)
    say(f"update bundle: {img.disk.name}'s rootfs as the next version (signed with the image's keys)")
    maker = BundleMaker(img, work / "bundles")
    bundle, version = maker.good(), maker.version(1)
    with SiteServer(work / "site") as site:
        url = site.url("10.0.2.2")  # the rig host as QEMU's user network shows it to the device
        say(f"site server: {site.url('127.0.0.1')} (data {site.data})")
        token = site.add_device(DEVICE)
        bundle_id = site.upload(bundle)
        rollout = site.deploy(bundle_id, DEVICE)
        say(f"deployment {rollout}: {bundle.name} (version {version}) to {DEVICE}, waiting for its first poll")
        ca_cert, ca_key = rig_factory_ca(work / "factory-ca")
        dut = QemuTarget(DEVICE, work / "device", config=QemuConfig(kvm=kvm, grow=1 << 30))
        with dut:
            prov = Provision(DEVICE, url, token, ca_cert, ca_key, recipe=img.recipe, metrics_url=f"{url}/v1/metrics")
            dut.flash(img.disk, provision=prov)
            say(f"flashed {img.disk.name}, provisioned as {DEVICE}; power on (serial log {dut.console.log_path})")
            dut.power_on()
            t0 = time.monotonic()
            a = dut.wait_ready("a", 900)
            say(f"slot a up and committed ({time.monotonic() - t0:.0f} s); the daemon polls the server")
            b = watch(site, "running", 1800, until_console=(dut, a.index))
            say("installed into slot b; the daemon rebooted into it; its health gate runs")
            ready = dut.wait_ready("b", 900, start=b.index)
            say(f"slot b committed, {ready.t - b.t:.0f} s after GRUB booted it")
            action = watch(site, "success", 300)
            say(f"the server has the result: {action['status']} ({action['last_message'] or action['last_execution']})")
            dev = site.wait_device(DEVICE, lambda d: bool(d["health"]), 180)
            say("the device's health, as the server received it:")
            print(site.cli("device", "list"), flush=True)
            dut.power_off(120)
        say(f"done: {DEVICE} runs {dev['version']} from slot {dev['booted_slot']}; log {dut.console.log_path}")
    return 0


def watch(site: SiteServer, until: str, timeout: float, *, until_console: tuple[QemuTarget, int] | None = None) -> Any:
    """Print the device's deployment as the server sees it (status, stage, download progress) as it changes,
    until its status is `until`; or, with `until_console`, until GRUB boots slot b on that device's console
    (returns the console's hit then)."""
    end = time.monotonic() + timeout
    last = ""
    while time.monotonic() < end:
        a = site.action(DEVICE)
        if a is not None:
            p = a["progress"]
            line = f"{a['status']} {a['last_execution'] or ''}" + (f" {p[0] * 100 // p[1]}%" if p and p[1] else "")
            if line != last:
                say(f"  server: action {a['action']}: {line}")
                last = line
            if a["status"] in ("failure", "canceled"):
                raise AssertionError(f"the update ended {a['status']}: {SiteServer.details(a)}")
            if until_console is None and a["status"] == until:
                return a
        if until_console is None:
            time.sleep(2)
            continue
        dut, start = until_console
        with contextlib.suppress(ConsoleTimeout):
            return dut.console.wait_for(r"pitstop-grub: booting slot b\b", 3, start=start)
    raise AssertionError(f"no {until} within {timeout:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
