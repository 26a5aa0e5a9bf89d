"""`pitstop image build` of a recipe: cold build, warm rebuild, image sizes, boot to ready under QEMU.

Issue targets (issue 4), each measured in this run:
- warm rebuild (the recipe unchanged except one overlay file, the stage cache of the cold build) takes at
  most 0.25x the cold build (an empty stage cache: mmdebstrap downloads and installs every package);
- pitstop's own start takes at most 2 s of the boot: the pitstop daemon's start (`pitstop.service`, Type=notify:
  interpreter start, imports, the bus, the API, the device state), from systemd's ExecMainStartTimestamp to
  the unit's ActiveEnterTimestamp (the daemon's READY=1), read inside the guest. Under TCG every instruction
  is emulated, so the guest also times, once the boot is over, `pitstop status` and a bare `python3 -c pass`:
  the interpreter alone is the floor pitstop's start is compared with.

Also printed: the image's sizes (apparent, allocated, mapped in the block map, compressed with `zstd -3`) and
the first bundle's; boot to ready: QEMU start to `PITSTOP-READY` on the serial console, and the guest's own
clock from its kernel's start to pitstop's unit starting.

How: the recipe and its files are copied to a temporary directory (the overlay edit never touches the
repository); both builds run `pitstop image build` as a subprocess with the same extra overlay, a
development hook that reports systemd's timestamps on the console and powers the guest off once pitstop's
unit has run. SOURCE_DATE_EPOCH is left unset, as a developer's build has it. The boot is of the warm
build's image, under TCG here (KVM where the CPU has vmx/svm, image/qemu.py), 1 vCPU, 1 GiB.

Usage:  sudo .venv/bin/python benchmarks/image_build.py [--recipe recipes/ipc-x86_64.toml] [--no-boot]
        [--json] [--keep DIR]

Exits 0 whatever the verdict (benchmarks report, tests judge); non-zero only when it could not measure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import human, machine, require_tools, run_timed

from pitstop.image import qemu, recipe

REPO = Path(__file__).resolve().parent.parent
WARM_TARGET = 0.25
START_TARGET_S = 2.0

REPORT_UNIT = """\
[Unit]
Description=benchmark: boot timings on the console, then power off
After=pitstop.service
Wants=pitstop.service

[Service]
Type=oneshot
ExecStart=/usr/local/lib/pitstop-bench/report
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
"""

REPORT = """\
#!/bin/sh
# Monotonic timestamps (microseconds since the kernel started) of pitstop's unit; then, on a quiet system,
# the wall time of `pitstop status` and of a bare `python3 -c pass` (the interpreter alone); then power off.
u=pitstop.service
v() { systemctl show -P "$1" "$u"; }
ms() { s=$(date +%s%N); "$@" >/dev/null 2>&1; e=$(date +%s%N); echo $(( (e - s) / 1000000 )); }
sleep 5
py=$(ms python3 -c pass)
st=$(ms /opt/pitstop/bin/pitstop status)
echo "BENCH-BOOT inactive_exit=$(v InactiveExitTimestampMonotonic) main_start=$(v ExecMainStartTimestampMonotonic)" \\
     "active_enter=$(v ActiveEnterTimestampMonotonic) idle_python_ms=$py idle_status_ms=$st" >/dev/console
systemctl --no-block poweroff
"""


def report_overlay(d: Path) -> Path:
    units = d / "etc/systemd/system"
    (units / "multi-user.target.wants").mkdir(parents=True)
    (units / "pitstop-bench-report.service").write_text(REPORT_UNIT)
    (units / "multi-user.target.wants" / "pitstop-bench-report.service").symlink_to("../pitstop-bench-report.service")
    script = d / "usr/local/lib/pitstop-bench/report"
    script.parent.mkdir(parents=True)
    script.write_text(REPORT)
    script.chmod(0o755)
    return d


def copy_recipe(src: Path, dest: Path) -> Path:
    """The recipe file and the directory of its files (same name without .toml), copied."""
    dest.mkdir(parents=True)
    shutil.copy2(src, dest / src.name)
    files = src.with_suffix("")
    if files.is_dir():
        shutil.copytree(files, dest / files.name, symlinks=True)
    return dest / src.name


def build(pitstop: str, recipe_path: Path, out: Path, cache: Path, hooks: Path) -> float:
    env_note = os.environ.pop("SOURCE_DATE_EPOCH", None)
    try:
        argv = [
            pitstop,
            "-q",
            "image",
            "build",
            str(recipe_path),
            "-o",
            str(out),
            "--cache",
            str(cache),
            "--extra-overlay",
            str(hooks),
        ]
        return run_timed(argv).wall
    finally:
        if env_note is not None:
            os.environ["SOURCE_DATE_EPOCH"] = env_note


def compressed_size(image: Path, tmp: Path) -> int:
    out = tmp / "image.zst"
    subprocess.run(["zstd", "-q", "-3", "-T0", "-f", str(image), "-o", str(out)], check=True)
    size = out.stat().st_size
    out.unlink()
    return size


def boot(image: Path, tmp: Path, limit: float = 600.0) -> dict[str, float]:
    """QEMU start → PITSTOP-READY (host clock) and the unit's timestamps the guest reported."""
    nvram = qemu.vars_copy("x86_64", tmp / "VARS.fd")
    argv = qemu.argv(image, nvram, qemu.BootOptions(memory_mib=1024, cpus=1, network=False))
    log = (tmp / "serial.log").open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    ready = None
    report: dict[str, float] = {}
    kvm = "-accel kvm" in " ".join(argv)
    try:
        while time.monotonic() - t0 < limit:
            r, _, _ = select.select([fd], [], [], 1.0)
            if not r:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                text = raw.decode("utf-8", "replace").replace("\r", "")
                t = time.monotonic() - t0
                log.write(f"[{t:7.2f}] {text}\n")
                if "PITSTOP-READY" in text and ready is None:
                    ready = t
                if "BENCH-BOOT" in text:
                    report = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", text)}
            if ready is not None and report:
                break
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
        log.close()
    if ready is None or not report:
        sys.exit(f"the image did not report ready within {limit:.0f} s (serial log: {tmp / 'serial.log'})")
    us = 1e6
    own = (report["active_enter"] - report["main_start"]) / us
    return {
        "boot_to_ready_s": ready,
        # The guest's clock starts with its kernel; the host saw QEMU start earlier (firmware, GRUB).
        "kernel_to_pitstop_unit_s": report["inactive_exit"] / us,
        "pitstop_own_start_s": own,
        "idle_pitstop_status_s": report["idle_status_ms"] / 1000,
        "idle_python_s": report["idle_python_ms"] / 1000,
        "host_python_s": host_python_s(),
        "kvm": float(kvm),
    }


def host_python_s(runs: int = 7) -> float:
    """The bare interpreter on this host (the image's Python is Debian's 3.11 too), median of `runs`: with the
    guest's figure it gives the emulation's slowdown, so TCG figures can be put in native terms."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(["/usr/bin/python3", "-c", "pass"], check=True)
        times.append(time.perf_counter() - t)
    return sorted(times)[runs // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "ipc-x86_64.toml")
    ap.add_argument("--no-boot", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", type=Path, help="keep the builds and logs in this directory")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("image builds need root (mmdebstrap --mode=root, chroot)")
    require_tools("mmdebstrap", "zstd", "qemu-system-x86_64")
    pitstop = str(Path(sys.executable).parent / "pitstop")
    recipe.load(args.recipe)
    work = Path(tempfile.mkdtemp(prefix="bench-image-", dir=args.keep))
    try:
        rpath = copy_recipe(args.recipe.resolve(), work / "recipe")
        r = recipe.load(rpath)
        hooks = report_overlay(work / "hooks")
        cache = work / "cache"
        cold = build(pitstop, rpath, work / "cold", cache, hooks)
        overlay = r.files.overlay
        if overlay is None:
            sys.exit(f"{args.recipe} has no overlay: the warm rebuild changes one overlay file")
        edited = overlay / "etc" / "pitstop-bench-edit"
        edited.parent.mkdir(parents=True, exist_ok=True)
        edited.write_text(f"changed at {time.time()}\n")
        warm = build(pitstop, rpath, work / "warm", cache, hooks)
        manifest = json.loads((work / "warm" / f"{r.name}.manifest.json").read_text())
        reused = {k: manifest["stages"][k]["reused"] for k in ("base", "system")}
        disk = work / "warm" / f"{r.name}.img"
        st = disk.stat()
        sizes = {
            "apparent": st.st_size,
            "allocated": st.st_blocks * 512,
            "mapped": manifest["artifacts"]["disk"]["mapped"],
            "zstd3": compressed_size(disk, work),
            "bundle": manifest["artifacts"]["bundle"]["size"],
            "rootfs": manifest["artifacts"]["rootfs"]["size"],
        }
        booted = {} if args.no_boot else boot(disk, work)
        results = {
            "machine": machine(),
            "recipe": str(args.recipe),
            "cold_s": cold,
            "warm_s": warm,
            "warm_over_cold": warm / cold,
            "warm_target": WARM_TARGET,
            "warm_reused": reused,
            "warm_stages_s": manifest["stages"]["seconds"],
            "sizes": sizes,
            "boot": booted,
        }
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            report(results)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(res: dict[str, object]) -> None:
    m = res["machine"]
    assert isinstance(m, dict)
    print(f"machine: {m['cpu']}, {m['cores']} cores; recipe {res['recipe']}")
    cold, warm, ratio = res["cold_s"], res["warm_s"], res["warm_over_cold"]
    assert isinstance(cold, float) and isinstance(warm, float) and isinstance(ratio, float)
    print(f"cold build (empty stage cache)            {cold:7.1f} s")
    print(
        f"warm rebuild (one overlay file changed)   {warm:7.1f} s   {ratio:.3f}x cold   "
        f"target <= {WARM_TARGET}x: {verdict(ratio <= WARM_TARGET)}"
    )
    print(f"  reused: {res['warm_reused']}; stages: {res['warm_stages_s']}")
    reused = res["warm_reused"]
    assert isinstance(reused, dict)
    if not reused.get("system"):
        print(
            "  WARNING: the warm rebuild rebuilt the system stage: pitstop's tree changed during the run "
            "(the wheel is part of its key), so this is not the figure the target is about; rerun"
        )
    s = res["sizes"]
    assert isinstance(s, dict)
    print(
        f"image: apparent {human(s['apparent'])}, allocated {human(s['allocated'])}, mapped {human(s['mapped'])}, "
        f"zstd -3 {human(s['zstd3'])}; rootfs {human(s['rootfs'])}; first bundle {human(s['bundle'])}"
    )
    b = res["boot"]
    assert isinstance(b, dict)
    if b:
        own = b["pitstop_own_start_s"]
        accel = "KVM" if b["kvm"] else "TCG"
        print(
            f"boot to ready (QEMU {accel}, 1 vCPU)         {b['boot_to_ready_s']:7.1f} s; kernel start to pitstop's "
            f"unit {b['kernel_to_pitstop_unit_s']:.1f} s"
        )
        print(
            f"pitstop's own start (daemon to READY=1) {own:7.2f} s   {own / START_TARGET_S:.3f}x the 2 s target: "
            f"{verdict(own <= START_TARGET_S)}"
        )
        print(
            f"  on the quiet system after boot: `pitstop status` {b['idle_pitstop_status_s']:.2f} s, "
            f"bare `python3 -c pass` {b['idle_python_s']:.2f} s ({accel}: compare with the interpreter alone)"
        )
        if not b["kvm"]:
            slow = b["idle_python_s"] / b["host_python_s"]
            print(
                f"  TCG runs the interpreter {slow:.0f}x slower than this host ({b['host_python_s'] * 1000:.0f} ms "
                f"here): in this host's terms, the daemon's start {own / slow:.2f} s, `pitstop status` "
                f"{b['idle_pitstop_status_s'] / slow:.2f} s (an estimate: {verdict(own / slow <= START_TARGET_S)} "
                "by it; a KVM or hardware boot measures it)"
            )


if __name__ == "__main__":
    sys.exit(main())
