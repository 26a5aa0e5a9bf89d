"""The root filesystem: Debian from mmdebstrap, configured for the recipe, pitstop installed, made into the ext4
image of a slot. Runs as root (mmdebstrap's root mode, chroot).

Stages, the slow one cached:

1. **base** (`<cache>/base/<key>.tar`): mmdebstrap's tarball of Debian with the recipe's packages (and
   `BASE_PACKAGES`). Its key covers exactly what changes it: suite, mirrors or snapshot, components,
   architecture, the package list, SOURCE_DATE_EPOCH and mmdebstrap's version; users, network, overlay and
   pitstop itself do not touch it. Minutes when built, nothing when reused.
2. **tree**: the base unpacked, the recipe's files written (`configure_tree`: pure file writes, tested without
   a Debian tree), then the commands that need the tree's own tools run in a chroot (`chroot_commands`:
   accounts, units, pitstop's virtual environment from a wheelhouse). Seconds plus pip.
   Cached as `<cache>/system/<key>.tree`, a directory, times clamped to the epoch.
3. **image**: a hard-linked copy of the system tree (seconds, where unpacking a tarball took half a minute),
   the overlay over it, then ext4 sized to its content (image/ext4.py), reproducible.

A foreign architecture (an arm64 image on an x86_64 host): the tree's programs run under qemu-user through
binfmt_misc, which `ensure_binfmt` sets up before the base and system stages; the wheels are downloaded for
the image's platform (`wheel_platform_args`); GRUB's modules for the ESP come from the tree (`ARCH_PACKAGES`).

Reproducible: mmdebstrap honours SOURCE_DATE_EPOCH; `base.snapshot` pins every package version through
snapshot.debian.org; Python byte code is compiled with SOURCE_DATE_EPOCH set (hash-based .pyc); host keys,
machine id, logs and caches are left out of the tree.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pitstop.atomic import atomic_write, fsync_dir
from pitstop.errors import CommandError
from pitstop.image import ext4, partitions, systemconf
from pitstop.image.datafs import DATA_LOG_DIR, IDENTITY_DIR, JOURNAL_DIR
from pitstop.image.errors import ImageBuildError
from pitstop.image.recipe import Recipe, render_hostname
from pitstop.image.recipe import dumps as recipe_json
from pitstop.runner import run

DEB_ARCH = {"x86_64": "amd64", "arm64": "arm64"}
KERNEL_PACKAGES = {"x86_64": "linux-image-amd64", "arm64": "linux-image-arm64"}
# Installed for the architecture whatever the recipe says. arm64: GRUB's arm64-efi modules, from which the ESP's
# GRUB is made (image/esp.py): grub-efi-arm64-bin cannot be installed on an amd64 build host, and taking it from
# the image's own Debian gives the version of the image's suite or snapshot, cached with the base.
ARCH_PACKAGES: dict[str, tuple[str, ...]] = {"x86_64": (), "arm64": ("grub-efi-arm64-bin",)}
# Where the rootfs holds GRUB's modules for the ESP's GRUB (arm64: ARCH_PACKAGES).
GRUB_MODULES_IN_TREE = {"arm64": "usr/lib/grub/arm64-efi"}
# Debian architecture -> the kernel's name for it (uname -m; binfmt_misc's qemu-<name> entries).
MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
# The wheels' target: Debian 12's Python, glibc 2.36 (manylinux_2_17 … manylinux_2_36).
PYTHON_VERSION = "3.11"
GLIBC_MINOR = 36
# What every image needs whatever the recipe says: a kernel and initramfs in the slot (GRUB loads /vmlinuz and
# /initrd.img), systemd, the fsck tools for the data partition and the ESP, Python for pitstop.
BASE_PACKAGES = (
    "initramfs-tools",
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "e2fsprogs",
    "dosfstools",
    "python3",
    "python3-venv",
)
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
)
VENV = "/opt/pitstop"
WHEELS_IN_TREE = "/opt/pitstop-wheels"  # inside the tree; removed before the image is made
SSH_KEYS_DIR = "/data/ssh"
UNIT_DIR = "etc/systemd/system"
# The daemon's files, from the pitstop installed in the tree (its package data): vendor locations, so that /etc
# can override them.
DAEMON_FILES = (
    ("pitstop.service", "/usr/lib/systemd/system/pitstop.service", 0o644),
    ("org.pitstop.Daemon1.conf", "/usr/share/dbus-1/system.d/org.pitstop.Daemon1.conf", 0o644),
    ("org.pitstop.Daemon1.xml", "/usr/share/dbus-1/interfaces/org.pitstop.Daemon1.xml", 0o644),
)
# Root and this group may call the daemon's methods (its bus policy and its own check).
CONTROL_GROUP = "pitstop"
ROOTFS_LABEL = "rootfs"
# Left out of every tree: per-device or per-build state that would make every device alike or every build differ.
_REMOVE = (
    "etc/ssh/ssh_host_*",
    "var/lib/dbus/machine-id",
    "var/lib/systemd/random-seed",
    "var/log/*.log",
    "var/log/apt/*",
    "var/cache/apt/*.bin",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "etc/*-",
    "etc/.pwd.lock",
)


# --- the base stage ---------------------------------------------------------------------------------------------


def packages(recipe: Recipe) -> list[str]:
    """Everything mmdebstrap installs, sorted and without duplicates: `BASE_PACKAGES`, the recipe's, and the
    architecture's default kernel unless the recipe names a `linux-image-*` package itself. A Jetson gets neither
    Debian's kernel nor GRUB: its kernel, initrd and boot chain are NVIDIA's (apply_binaries, image/jetson.py)."""
    include = recipe.packages.include
    arch = recipe.target.arch
    if is_jetson(recipe):
        return sorted({*BASE_PACKAGES, *include} - {"initramfs-tools"})
    kernel = [] if any(p.startswith("linux-image-") for p in include) else [KERNEL_PACKAGES[arch]]
    return sorted({*BASE_PACKAGES, *ARCH_PACKAGES[arch], *kernel, *include})


def is_jetson(recipe: Recipe) -> bool:
    return recipe.target.bootloader == "nvbootctrl"


def apt_sources(recipe: Recipe) -> list[str]:
    b = recipe.base
    mirror, security = b.mirror, b.security_mirror
    if b.snapshot is not None:
        mirror = f"http://snapshot.debian.org/archive/debian/{b.snapshot}"
        security = f"http://snapshot.debian.org/archive/debian-security/{b.snapshot}"
    comps = " ".join(b.components)
    return [
        f"deb {mirror} {b.suite} {comps}",
        f"deb {mirror} {b.suite}-updates {comps}",
        f"deb {security} {b.suite}-security {comps}",
    ]


# Architectures whose base makes the initramfs once, at its end. mkinitramfs under qemu-user takes minutes, and
# one mmdebstrap ran it several times (the kernel's postinst, then the triggers of initramfs-tools and of the
# packages with initramfs hooks): update-initramfs is diverted to a no-op once the essential packages are in,
# and put back and run for each kernel once everything is installed (docs/image.md "arm64"). The kernel's
# postinst still makes the /vmlinuz and /initrd.img links GRUB loads.
INITRAMFS_ONCE = frozenset({"arm64"})
_UPDATE_INITRAMFS = "/usr/sbin/update-initramfs"


def initramfs_once_hooks() -> list[str]:
    """mmdebstrap hooks (run by sh with the tree as $1) that make the base's initramfs once."""
    u = _UPDATE_INITRAMFS
    divert = f'chroot "$1" dpkg-divert --quiet --local --rename --divert {u}.pitstop-once --add {u}'
    stub = f'printf \'#!/bin/sh\\nexit 0\\n\' > "$1{u}" && chmod 755 "$1{u}"'
    restore = f'rm -f "$1{u}" && chroot "$1" dpkg-divert --quiet --local --rename --remove {u}'
    make = 'for k in $(ls "$1/usr/lib/modules"); do chroot "$1" update-initramfs -c -k "$k" || exit 1; done'
    return [f"--essential-hook={divert} && {stub}", f"--customize-hook={restore} && {make}"]


def mmdebstrap_argv(recipe: Recipe, out: Path) -> list[str]:
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        f"--arch={DEB_ARCH[recipe.target.arch]}",
        "--format=tar",
        f"--include={','.join(packages(recipe))}",
    ]
    argv += [f"--dpkgopt={o}" for o in DPKG_OPTIONS]
    if recipe.target.arch in INITRAMFS_ONCE:
        argv += initramfs_once_hooks()
    if recipe.base.snapshot is not None:
        # Snapshot Release files are old by design.
        argv.append('--aptopt=Acquire::Check-Valid-Until "false"')
    return [*argv, recipe.base.suite, str(out), *apt_sources(recipe)]


# --- a foreign architecture: binfmt_misc and qemu-user ------------------------------------------------------


def host_deb_arch(machine: str | None = None) -> str:
    """The build host's Debian architecture (`machine`: uname -m; default this host's)."""
    m = machine or os.uname().machine
    return next((deb for deb, name in MACHINE.items() if name == m), m)


@dataclass(frozen=True)
class BinfmtState:
    """What the host has for running `target`'s programs (a Debian architecture) through binfmt_misc."""

    host: str  # Debian architecture of the build host
    target: str
    mounted: bool  # /proc/sys/fs/binfmt_misc is mounted
    entry: str | None  # the kernel's qemu-<machine> entry: "enabled", "disabled", None: not registered
    format_known: bool  # binfmt-support knows the format (qemu-user-static installed its /usr/share/binfmts file)
    update_binfmts: bool  # the update-binfmts tool exists


def binfmt_plan(state: BinfmtState) -> list[str]:
    """What to do so that the kernel runs `state.target`'s programs: nothing for the host's own architecture,
    else the steps from ("mount", "enable"); ImageBuildError, one line saying what to install, when no step
    can get there. Pure: `binfmt_state` gathers the state, `ensure_binfmt` runs the steps."""
    if state.target == state.host:
        return []
    machine = MACHINE.get(state.target, state.target)
    steps = [] if state.mounted else ["mount"]
    if state.entry == "enabled":
        return steps
    if not (state.update_binfmts and state.format_known):
        raise ImageBuildError(
            f"building a {state.target} rootfs on this {state.host} host needs qemu-user through binfmt_misc: "
            f"apt-get install qemu-user-static binfmt-support (no qemu-{machine} binfmt format is known here)"
        )
    return [*steps, "enable"]


def binfmt_state(target: str, binfmt: Path = BINFMT_DIR) -> BinfmtState:
    machine = MACHINE.get(target, target)
    entry: str | None = None
    try:
        first = (binfmt / f"qemu-{machine}").read_text().splitlines()[:1]
        entry = first[0].strip() if first else None
    except OSError:
        pass
    return BinfmtState(
        host=host_deb_arch(),
        target=target,
        mounted=(binfmt / "status").exists(),
        entry=entry,
        format_known=Path(f"/usr/share/binfmts/qemu-{machine}").is_file(),
        update_binfmts=shutil.which("update-binfmts") is not None,
    )


def ensure_binfmt(target: str) -> None:
    """The kernel runs `target`'s (a Debian architecture) programs through qemu-user, as mmdebstrap and the
    chroot steps need for a foreign rootfs: binfmt_misc mounted (no systemd mounts it on a container host) and
    qemu-<machine> enabled. ImageBuildError with what to install or run when that cannot be done here."""
    machine = MACHINE.get(target, target)
    for step in binfmt_plan(binfmt_state(target)):
        try:
            if step == "mount":
                run(["mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT_DIR])
            else:
                run(["update-binfmts", "--enable", f"qemu-{machine}"])
        except CommandError as e:
            said = (e.stderr.strip().splitlines() or [e.message])[-1]
            what = (
                f"mount -t binfmt_misc binfmt_misc {BINFMT_DIR}"
                if step == "mount"
                else f"update-binfmts --enable qemu-{machine}"
            )
            raise ImageBuildError(f"cannot run {target} programs on this host: `{what}` failed: {said}") from None
    if target != host_deb_arch() and binfmt_state(target).entry != "enabled":
        raise ImageBuildError(
            f"cannot run {target} programs on this host: binfmt_misc has no enabled qemu-{machine} entry after "
            f"update-binfmts --enable qemu-{machine}"
        )


def mmdebstrap_version() -> str:
    m = re.search(r"mmdebstrap (\S+)", run(["mmdebstrap", "--version"]).text)
    return m[1] if m else "unknown"


def base_key(recipe: Recipe, epoch: int | None, tool: str) -> str:
    """What the base tarball depends on, hashed. `epoch`: SOURCE_DATE_EPOCH when the caller pinned one (a
    reproducible build), None when the build just uses the current time: then the base is reused across builds."""
    fields = {
        "sources": apt_sources(recipe),
        "arch": recipe.target.arch,
        "packages": packages(recipe),
        "dpkg": list(DPKG_OPTIONS),
        "epoch": epoch,
        "mmdebstrap": tool,
    }
    if recipe.target.arch in INITRAMFS_ONCE:  # only there, so that other architectures keep their keys
        fields["hooks"] = initramfs_once_hooks()
    return _digest(fields)


def _digest(fields: object) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Stage:
    """A cached stage's output: where it is, its key, whether this build reused it."""

    path: Path
    key: str
    reused: bool


@dataclass(frozen=True)
class Cache:
    """Stage outputs by key, each written beside its final name and renamed into place when complete."""

    root: Path

    def path(self, stage: str, key: str, suffix: str) -> Path:
        return self.root / stage / f"{key}{suffix}"

    def prune(self, stage: str, keep: int = 3) -> None:
        """Keep the outputs of the `keep` most recently used keys of `stage` (a key's files go together)."""
        d = self.root / stage
        if not d.is_dir():
            return
        by_key: dict[str, list[Path]] = {}
        for p in d.iterdir():
            if not p.name.startswith("."):
                by_key.setdefault(p.name.split(".", 1)[0], []).append(p)
        ranked = sorted(by_key.values(), key=lambda ps: max(p.stat().st_mtime for p in ps))
        for ps in ranked[:-keep]:
            for p in ps:
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def build_base(recipe: Recipe, cache: Cache, epoch: int, *, pinned: bool = True, refresh: bool = False) -> Stage:
    """The base tarball, from the cache if there (unless `refresh`). `pinned`: `epoch` is the caller's
    SOURCE_DATE_EPOCH and part of the key; otherwise the build's current time, left out of the key."""
    key = base_key(recipe, epoch if pinned else None, mmdebstrap_version())
    out = cache.path("base", key, ".tar")
    if out.is_file() and not refresh:
        os.utime(out)
        return Stage(out, key, True)
    ensure_binfmt(DEB_ARCH[recipe.target.arch])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        run(mmdebstrap_argv(recipe, tmp), env={"SOURCE_DATE_EPOCH": str(epoch)}, capture=True)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    cache.prune("base")
    return Stage(out, key, False)


def unpack(tar: Path, tree: Path) -> None:
    tree.mkdir(parents=True)
    run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", tar, "-C", tree])


# --- configuring the tree: files ------------------------------------------------------------------------------


def in_tree(tree: Path, path: str | Path) -> Path:
    """`tree`/`path`, refused if any directory on the way is a symlink: the tree's symlinks point into the
    device's file system (/var/run -> /run), and following one on the build host would write outside the tree."""
    dest = tree / str(path).lstrip("/")
    rel = dest.relative_to(tree)
    p = tree
    for part in rel.parts[:-1]:
        p = p / part
        if p.is_symlink():
            raise ImageBuildError(f"{rel} goes through the symlink /{p.relative_to(tree)} of the image")
    return dest


def _write(tree: Path, path: str, text: str, mode: int = 0o644) -> None:
    dest = in_tree(tree, path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    os.chmod(dest, mode)


def _symlink(tree: Path, path: str, target: str) -> None:
    dest = in_tree(tree, path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.exists():
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        else:
            dest.unlink()
    dest.symlink_to(target)


# data and the ESP are required, not `nofail`: a slot that cannot mount them goes to emergency mode, is never
# marked good, and GRUB's counter falls back to the other slot. Required mounts are also ordered before
# local-fs.target, so the journal, /var/log and every service find them (notes/qemu-ab-image.md, pitfall 4).
FSTAB = f"""\
# pitstop: the root filesystem is a read-only slot; what changes lives on data or in tmpfs (docs/image.md).
PARTLABEL=data  {systemconf.DATA_DIR}  ext4  defaults,noatime,x-systemd.growfs,x-systemd.device-timeout=90s  0  2
PARTLABEL=esp   {systemconf.ESP_MOUNT}  vfat  umask=0077,sync,x-systemd.device-timeout=90s  0  2
tmpfs  /tmp      tmpfs  mode=1777,nosuid,nodev  0  0
tmpfs  /var/tmp  tmpfs  mode=1777,nosuid,nodev  0  0
"""
# The data partition takes the rest of whatever disk the image is flashed to: systemd-repart grows it at boot
# (it never shrinks, moves or deletes a partition, and moves the backup GPT to the disk's end), then
# x-systemd.growfs in FSTAB grows the mounted filesystem. It matches partitions by type: data is the only
# Linux-data partition of the layout (image/partitions.py), the slots have the root type.
REPART_DATA = ("/usr/lib/repart.d/50-pitstop-data.conf", "[Partition]\nType=linux-generic\n")
# Writable places of a read-only root, moved to the data partition: (path in the tree, path on data). /var/log
# holds the journal (when persistent), wtmp and the logs of services such as chrony.
MOVED_TO_DATA = (("var/log", DATA_LOG_DIR),)
# State directories (systemd StateDirectory=) that services expect and cannot create on a read-only root.
STATE_DIRS = ("var/lib/systemd/linger",)

# A Jetson: NVIDIA's layout has no pitstop data partition, so pitstop's data is NVIDIA's UDA ("may be mounted and
# used to store user data", flash_l4t_t234_nvme_rootfs_ab.xml). NVIDIA's tools leave it without a filesystem:
# x-systemd.makefs makes ext4 on it at the first boot (systemd-makefs leaves a partition that has one alone).
# NVIDIA's ESP is not mounted: pitstop keeps nothing there (nvbootctrl holds the boot state).
JETSON_DATA_LABEL = "UDA"
JETSON_DATA_OPTIONS = "defaults,noatime,x-systemd.makefs,x-systemd.device-timeout=90s"
JETSON_FSTAB = f"""\
# pitstop on a Jetson: the root filesystem is a read-only slot (APP or APP_b); what changes lives on data (NVIDIA's
# UDA partition, made ext4 at the first boot) or in tmpfs (docs/jetson-flashing.md).
PARTLABEL={JETSON_DATA_LABEL}  {systemconf.DATA_DIR}  ext4  {JETSON_DATA_OPTIONS}  0  2
tmpfs  /tmp      tmpfs  mode=1777,nosuid,nodev  0  0
tmpfs  /var/tmp  tmpfs  mode=1777,nosuid,nodev  0  0
"""

HOSTNAME_UNIT = f"""\
[Unit]
Description=pitstop: host name from the device identity
RequiresMountsFor={systemconf.DATA_DIR}
ConditionPathExists={systemconf.DATA_DIR}/{IDENTITY_DIR}/hostname
Before=network-pre.target
Wants=network-pre.target

[Service]
Type=oneshot
ExecStart=/bin/hostname -F {systemconf.DATA_DIR}/{IDENTITY_DIR}/hostname

[Install]
WantedBy=multi-user.target
"""

SSH_KEYS_UNIT = f"""\
[Unit]
Description=pitstop: this device's SSH host keys, made once on the data partition
RequiresMountsFor={systemconf.DATA_DIR}
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/bin/mkdir -p -m 0700 {SSH_KEYS_DIR}/etc/ssh
ExecStart=/usr/bin/ssh-keygen -A -f {SSH_KEYS_DIR}

[Install]
WantedBy=ssh.service
"""


# Emergency and rescue mode (recipe boot.emergency_reboot_s). A slot whose kernel boots but whose userspace fails
# early (a required mount, a unit isolating emergency.target) lands in emergency.service, whose sulogin cannot
# let anyone in (root is locked) and waits for Enter forever: nobody is at an edge device's console, the slot never
# reboots and its boot counter never falls back. Vendor drop-ins (an /etc drop-in of the same name, e.g. from the
# overlay, replaces them) run EMERGENCY_SCRIPT instead: one line on the console, a pause, a reboot.
EMERGENCY_UNITS = ("emergency", "rescue")
EMERGENCY_SCRIPT = "/usr/lib/pitstop/emergency-reboot"
EMERGENCY_DROPIN = "50-pitstop-reboot.conf"
# Run by the drop-ins as `emergency-reboot MODE SECONDS`, with systemd's PATH. Why each step:
# - the failed units come from PID 1 over its private socket (neither dbus-daemon nor logind runs in emergency
#   mode), within 5 s, so a wedged manager delays the reboot by no more than that;
# - `systemctl --force reboot` asks PID 1 to reboot without stopping units one by one (they are in no state to stop
#   cleanly: a mount job may still be waiting for its device), yet it still kills every process and unmounts or
#   remounts read-only every filesystem before rebooting; plain `reboot` would queue a clean shutdown behind them;
# - if PID 1 cannot be asked, or took the request and a minute later this script still runs (it is killed on the
#   way down), `reboot -f` syncs and calls reboot(2) itself.
EMERGENCY_SCRIPT_TEXT = """\
#!/bin/sh
# pitstop: run by emergency.service and rescue.service instead of a login shell nobody can use (root is locked,
# nobody is at the console): say why on the console, wait, reboot, so that the boot counter of a failing slot
# falls back to the other slot once its tries are spent. Usage: emergency-reboot MODE SECONDS (docs/image.md).
set -u -f
mode=${1:-emergency}
delay=${2:-30}
n=0
shown=
failed=$(timeout 5 systemctl list-units --state=failed --plain --no-legend --no-pager 2>/dev/null | awk '{print $1}')
for unit in $failed; do
    n=$((n + 1))
    if [ "$n" -le 3 ]; then shown="$shown $unit"; fi
done
if [ "$n" -eq 0 ]; then
    reason="no unit failed"
elif [ "$n" -le 3 ]; then
    reason="failed:$shown"
else
    reason="failed:$shown and $((n - 3)) more"
fi
echo "pitstop: $mode mode ($reason); rebooting in $delay s: a slot on trial falls back once its tries are spent"
sleep "$delay"
if systemctl --force reboot; then
    sleep 60
fi
echo "pitstop: systemd did not reboot; reboot -f"
reboot -f
"""


def emergency_dropin(unit: str, delay_s: int) -> str:
    """The drop-in of `unit` (emergency or rescue): ExecStart reset, then the script. The unit's
    StandardInput=tty-force is reset: the script reads nothing, so it neither takes the console over nor becomes
    its controlling process; output still goes to the console (TTYPath=, written to only), as the unit's
    StandardOutput=inherit sent it."""
    return (
        f"# pitstop (recipe boot.emergency_reboot_s = {delay_s}): instead of a login shell nobody can use, say why\n"
        f"# on the console, wait {delay_s} s and reboot (docs/image.md). An /etc/systemd/system/{unit}.service.d/\n"
        f"# {EMERGENCY_DROPIN} replaces this file.\n"
        "[Service]\n"
        "ExecStart=\n"
        f"ExecStart=-{EMERGENCY_SCRIPT} {unit} {delay_s}\n"
        "StandardInput=null\n"
        "StandardOutput=tty\n"
        "TTYPath=/dev/console\n"
    )


def emergency_files(recipe: Recipe) -> dict[str, tuple[str, int]]:
    """Path in the tree -> (content, mode) of the emergency reboot: the script and one drop-in per unit; nothing
    when `boot.emergency_reboot_s` is 0 (systemd's own shell stays). The content depends only on the recipe."""
    delay = recipe.boot.emergency_reboot_s
    if delay == 0:
        return {}
    out = {EMERGENCY_SCRIPT: (EMERGENCY_SCRIPT_TEXT, 0o755)}
    for unit in EMERGENCY_UNITS:
        out[f"/usr/lib/systemd/system/{unit}.service.d/{EMERGENCY_DROPIN}"] = (emergency_dropin(unit, delay), 0o644)
    return out


def sshd_config(recipe: Recipe) -> str:
    s = recipe.ssh
    lines = [
        "# pitstop (recipe [ssh]); host keys are per device, on the data partition",
        f"PasswordAuthentication {'yes' if s.password_authentication else 'no'}",
        f"PermitRootLogin {s.permit_root_login}",
    ]
    lines += [f"HostKey {SSH_KEYS_DIR}/etc/ssh/ssh_host_{t}_key" for t in ("ed25519", "ecdsa", "rsa")]
    return "\n".join(lines) + "\n"


def network_files(recipe: Recipe) -> dict[str, str]:
    """systemd-networkd .network files, one per [[network.interface]], in order (first match wins)."""
    out = {}
    for n, i in enumerate(recipe.network.interface, start=1):
        lines = ["[Match]", f"Name={i.match}", "", "[Network]", f"DHCP={'yes' if i.dhcp else 'no'}"]
        lines += [f"Address={a}" for a in i.address]
        lines += [f"Gateway={i.gateway}"] if i.gateway else []
        lines += [f"DNS={d}" for d in i.dns]
        out[f"etc/systemd/network/{10 + n}-pitstop.network"] = "\n".join(lines) + "\n"
    return out


def system_toml(recipe: Recipe) -> systemconf.SystemToml:
    """The device's system.toml: GRUB's slots, or on a Jetson nvbootctrl with NVIDIA's APP/APP_b."""
    if is_jetson(recipe):
        return systemconf.SystemToml(
            recipe.target.compatible,
            tries=recipe.boot.tries,
            clock=recipe.keys.clock,
            backend="nvbootctrl",
            slots=systemconf.JETSON_SLOTS,
        )
    return systemconf.SystemToml(recipe.target.compatible, tries=recipe.boot.tries, clock=recipe.keys.clock)


def configure_tree(recipe: Recipe, tree: Path, *, keyring_pem: bytes) -> list[str]:
    """Write the recipe's files into `tree` (a Debian tree or an empty directory). Returns the units to enable."""
    units = []
    _write(tree, systemconf.PATH, systemconf.render(system_toml(recipe)))
    _write(tree, systemconf.KEYRING_PATH, keyring_pem.decode())
    if recipe.daemon.config is not None:
        _write(tree, "/etc/pitstop/pitstop.toml", recipe.daemon.config.read_text())
    for path, (text, mode) in emergency_files(recipe).items():
        _write(tree, path, text, mode)
    if is_jetson(recipe):
        _write(tree, "/etc/fstab", JETSON_FSTAB)
        (tree / systemconf.DATA_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)
    else:
        _write(tree, "/etc/fstab", FSTAB)
        _write(tree, *REPART_DATA)
        for d in (systemconf.DATA_DIR, systemconf.ESP_MOUNT):
            (tree / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
    pattern = recipe.system.hostname
    _write(tree, "/etc/hostname", render_hostname(pattern, "unprovisioned") + "\n")
    if "{device_id}" in pattern:
        _write(tree, f"{UNIT_DIR}/pitstop-hostname.service", HOSTNAME_UNIT)
        units.append("pitstop-hostname.service")
    _write(tree, "/etc/timezone", recipe.system.timezone + "\n")
    _symlink(tree, "/etc/localtime", f"/usr/share/zoneinfo/{recipe.system.timezone}")
    _write(tree, "/etc/machine-id", "")  # empty: systemd makes one at boot (the rootfs is read-only)
    for path, text in network_files(recipe).items():
        _write(tree, path, text)
    if recipe.network.ntp:
        _write(
            tree, "/etc/chrony/sources.d/pitstop.sources", "".join(f"server {n} iburst\n" for n in recipe.network.ntp)
        )
    _write(tree, "/etc/ssh/sshd_config.d/50-pitstop.conf", sshd_config(recipe))
    _write(tree, f"{UNIT_DIR}/pitstop-ssh-hostkeys.service", SSH_KEYS_UNIT)
    units.append("pitstop-ssh-hostkeys.service")
    tmpfiles = []
    for path, on_data in MOVED_TO_DATA:
        _symlink(tree, path, f"{systemconf.DATA_DIR}/{on_data}")
        tmpfiles.append(f"d {systemconf.DATA_DIR}/{on_data} 0755 root root - -")
    for path in STATE_DIRS:
        in_tree(tree, path).mkdir(parents=True, exist_ok=True)
    if recipe.system.persistent_journal:
        tmpfiles += [
            f"d {systemconf.DATA_DIR}/{JOURNAL_DIR} 2755 root systemd-journal - -",
            f"z {systemconf.DATA_DIR}/{JOURNAL_DIR} 2755 root systemd-journal - -",
        ]
    else:
        _write(tree, "/etc/systemd/journald.conf.d/50-pitstop.conf", "[Journal]\nStorage=volatile\n")
    _write(tree, "/etc/tmpfiles.d/pitstop.conf", "".join(f"{t}\n" for t in tmpfiles))
    if recipe.daemon.enable:
        units.append("pitstop.service")
    units += ["systemd-networkd.service"] + (
        ["systemd-resolved.service"] if "systemd-resolved" in packages(recipe) else []
    )
    return units


def copy_overlay(overlay: Path, tree: Path) -> None:
    """The overlay over the tree, owner root, modes kept; a symlink or file replaces what is there."""
    for src in sorted(overlay.rglob("*")):
        rel = src.relative_to(overlay)
        dest = in_tree(tree, rel)
        if src.is_dir() and not src.is_symlink():
            dest.mkdir(parents=True, exist_ok=True)
            os.chmod(dest, src.stat().st_mode & 0o7777)
        else:
            if dest.is_symlink() or dest.is_file():
                dest.unlink()
            elif dest.is_dir():
                raise ImageBuildError(f"overlay {rel} is a file, the image has a directory there")
            if src.is_symlink():
                dest.symlink_to(os.readlink(src))
            else:
                shutil.copy2(src, dest, follow_symlinks=False)
        os.lchown(dest, 0, 0)


def clean_tree(tree: Path) -> None:
    """Remove what must not be in an image (`_REMOVE`). Run on the unpacked base, before the tree has symlinks
    of its own that glob could follow out of it."""
    for pattern in _REMOVE:
        for p in tree.glob(pattern):
            in_tree(tree, p.relative_to(tree))
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


# --- configuring the tree: commands in a chroot ------------------------------------------------------------------


def user_commands(recipe: Recipe) -> list[list[str]]:
    cmds = []
    for u in recipe.user:
        cmd = ["useradd", "--create-home", "--shell", u.shell]
        if u.uid is not None:
            cmd += ["--uid", str(u.uid)]
        if u.groups:
            cmd += ["--groups", ",".join(u.groups)]
        cmds += [[*cmd, u.name], ["passwd", "--lock", u.name]]
    return cmds


def install_daemon_files(tree: Path) -> None:
    """The unit, bus policy and interface of the pitstop the tree's venv holds, where systemd and D-Bus look."""
    found = sorted(in_tree(tree, VENV).glob("lib/python3*/site-packages/pitstop/daemon/data"))
    if len(found) != 1:
        raise ImageBuildError(f"pitstop's daemon files not found in the image's {VENV} ({len(found)} candidates)")
    for name, dest, mode in DAEMON_FILES:
        _write(tree, dest, (found[0] / name).read_text(), mode)


def check_daemon_config() -> list[str]:
    """The image's own pitstop checks the recipe's daemon configuration: an image never boots into a daemon
    that refuses it (a bad key fails the build, with the daemon's message)."""
    return [f"{VENV}/bin/pitstop", "daemon", "--check"]


def group_commands() -> list[list[str]]:
    """Before the recipe's users, who may be members."""
    return [["groupadd", "--system", CONTROL_GROUP]]


def pitstop_commands() -> list[list[str]]:
    return [
        ["python3", "-m", "venv", VENV],
        [f"{VENV}/bin/pip", "install", "--no-index", "--no-cache-dir", "--find-links", WHEELS_IN_TREE, "pitstop"],
        ["ln", "-sf", f"{VENV}/bin/pitstop", "/usr/local/bin/pitstop"],
    ]


def chroot(tree: Path, cmd: Sequence[str], epoch: int) -> None:
    env = {
        "SOURCE_DATE_EPOCH": str(epoch),
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
    }
    run(["chroot", tree, *cmd], env=env)


def install_authorized_keys(recipe: Recipe, tree: Path) -> None:
    passwd = {ln.split(":")[0]: ln.split(":") for ln in (tree / "etc/passwd").read_text().splitlines() if ln}
    for u in recipe.user:
        if not u.ssh_keys:
            continue
        entry = passwd.get(u.name)
        if entry is None:
            raise ImageBuildError(f"user {u.name} was not created")
        uid, gid, home = int(entry[2]), int(entry[3]), entry[5]
        ssh = tree / home.lstrip("/") / ".ssh"
        ssh.mkdir(mode=0o700, exist_ok=True)
        keys = "".join(k.read_text() if k.read_text().endswith("\n") else k.read_text() + "\n" for k in u.ssh_keys)
        (ssh / "authorized_keys").write_text(keys)
        os.chmod(ssh / "authorized_keys", 0o600)
        for p in (ssh, ssh / "authorized_keys"):
            os.chown(p, uid, gid)


def wheel_platform_args(arch: str) -> list[str]:
    """`pip download`'s target for the image's Python: Debian 12's CPython 3.11 on glibc 2.36 for `arch` (a
    recipe's target.arch), whatever Python or machine the build runs on. Binary wheels only: nothing is
    compiled for the image."""
    machine = MACHINE[DEB_ARCH[arch]]
    tags = [f"manylinux_2_{minor}_{machine}" for minor in range(GLIBC_MINOR, 16, -1)] + [f"manylinux2014_{machine}"]
    args = [f"--platform={t}" for t in tags]
    args += [f"--python-version={PYTHON_VERSION}", "--implementation=cp", "--only-binary=:all:"]
    return args


def wheelhouse(repo: Path, dest: Path, cache: Cache, *, arch: str = "x86_64") -> Path:
    """pitstop's wheel from `repo` and the wheels of its dependencies for `arch` (a recipe's target.arch), for
    the image's Python (`wheel_platform_args`): downloaded once per dependency list and architecture."""
    dest.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", dest, repo])
    pitstop_wheel = sorted(dest.glob("pitstop-*.whl"))
    if not pitstop_wheel:
        raise ImageBuildError(f"pip made no pitstop wheel from {repo}")
    platform = wheel_platform_args(arch)
    deps_key = _digest(
        {"pyproject": hashlib.sha256((repo / "pyproject.toml").read_bytes()).hexdigest(), "pip": platform}
    )
    deps = cache.path("wheels", deps_key, "")
    if not deps.is_dir():
        tmp = deps.with_name(f".{deps.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--dest",
                tmp,
                *platform,
                pitstop_wheel[-1],
            ]
        )
        os.replace(tmp, deps)
    for w in deps.iterdir():
        if not w.name.startswith("pitstop-"):
            shutil.copy2(w, dest / w.name)
    return dest


# --- the system stage: the base configured, pitstop installed (cached) --------------------------------------


def wheels_digest(wheels: Path) -> str:
    """The wheelhouse's identity: each wheel's name and the content of its members (zip timestamps aside)."""
    h = hashlib.sha256()
    for w in sorted(wheels.glob("*.whl")):
        h.update(w.name.encode() + b"\0")
        with zipfile.ZipFile(w) as z:
            for info in sorted(z.infolist(), key=lambda i: i.filename):
                h.update(f"{info.filename}\0{info.CRC:08x}\0{info.file_size}\0".encode())
    return h.hexdigest()


def system_key(recipe: Recipe, base: str, wheels: str, keyring_pem: bytes, epoch: int | None) -> str:
    """What the system stage depends on: the base, the recipe minus what only later stages use (overlay,
    partitions, bundle, models), the content of the files it reads, pitstop's wheels, the keyring."""
    fields = json.loads(recipe_json(recipe))
    for later in ("files", "partitions", "bundle", "model", "description"):
        fields.pop(later, None)
    files = [k for u in recipe.user for k in u.ssh_keys] + ([recipe.daemon.config] if recipe.daemon.config else [])
    return _digest(
        {
            "base": base,
            "recipe": fields,
            "files": [hashlib.sha256(p.read_bytes()).hexdigest() for p in files],
            "wheels": wheels,
            "keyring": hashlib.sha256(keyring_pem).hexdigest(),
            "epoch": epoch,
        }
    )


@dataclass(frozen=True)
class System(Stage):
    packages: list[str]  # "name version" of every Debian package installed


def build_system(
    recipe: Recipe,
    cache: Cache,
    base: Stage,
    *,
    keyring_pem: bytes,
    wheels: Path,
    epoch: int,
    pinned: bool = True,
) -> System:
    """The configured tree as a tarball: the base unpacked and cleaned, the recipe's files, accounts, pitstop's
    virtual environment, units enabled. Cached: an image whose recipe changed only in its overlay, partitions,
    bundle or models reuses it."""
    key = system_key(recipe, base.key, wheels_digest(wheels), keyring_pem, epoch if pinned else None)
    out = cache.path("system", key, ".tree")
    listing = cache.path("system", key, ".packages")
    if out.is_dir() and listing.is_file():
        os.utime(out)
        os.utime(listing)
        return System(out, key, True, listing.read_text().splitlines())
    ensure_binfmt(DEB_ARCH[recipe.target.arch])  # the chroot steps run the tree's programs
    out.parent.mkdir(parents=True, exist_ok=True)
    tree = out.with_name(f".{out.name}.tmp")  # in the cache, so the rootfs stage can hard-link it
    for stale in out.parent.glob(".*.tree.tmp"):  # an interrupted build's
        shutil.rmtree(stale)
    unpack(base.path, tree)
    clean_tree(tree)
    units = configure_tree(recipe, tree, keyring_pem=keyring_pem)
    shutil.copytree(wheels, in_tree(tree, WHEELS_IN_TREE))
    for cmd in [*group_commands(), *user_commands(recipe), *pitstop_commands()]:
        chroot(tree, cmd, epoch)
    install_daemon_files(tree)
    try:
        chroot(tree, check_daemon_config(), epoch)
    except CommandError as e:
        said = e.stderr.strip().splitlines()[-1:] or [e.message]
        raise ImageBuildError(f"the image's pitstop refuses the recipe's daemon configuration: {said[0]}") from None
    chroot(tree, ["systemctl", "enable", *units], epoch)
    install_authorized_keys(recipe, tree)
    pkgs = installed_packages(tree)
    shutil.rmtree(in_tree(tree, WHEELS_IN_TREE))
    for junk in ("etc/ssh/ssh_host_*", "etc/*-"):  # what the chroot steps may have made (useradd backups)
        for p in tree.glob(junk):
            p.unlink()
    # Clamped once here, so the rootfs stage's clamp of its hard-linked copy rewrites nothing.
    ext4.clamp_tree_times(tree, epoch)
    atomic_write(listing, "".join(f"{p}\n" for p in pkgs).encode())
    os.sync()  # the tree's files on disk before the rename makes it a cache entry
    os.replace(tree, out)
    fsync_dir(out.parent)
    cache.prune("system")
    return System(out, key, False, pkgs)


def link_copy(tree: Path, dest: Path) -> None:
    """`dest` as a copy of `tree` whose files are hard links to the tree's (owners, modes, times and extended
    attributes kept; directories are new). Seconds instead of the half a minute a tar takes; anything writing
    into the copy must replace files, never write into them (copy_overlay does)."""
    run(["cp", "-a", "--link", "--no-target-directory", tree, dest])


# --- the rootfs stage: the system with the overlay, as a filesystem image ----------------------------------------

# Room left in the rootfs image beyond what its files take: ext4's metadata (inode tables, journal, bitmaps).
FS_OVERHEAD = 1.10
FS_EXTRA = 64 << 20
FS_ALIGN = 16 << 20


def tree_usage(tree: Path) -> tuple[int, int]:
    """(bytes in 4 KiB blocks, inodes) that `tree` takes, hard links counted once."""
    seen: set[int] = set()
    blocks = inodes = 0
    for root, dirs, files in os.walk(tree):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            inodes += 1
            blocks += -(-st.st_size // 4096) if not stat.S_ISLNK(st.st_mode) or st.st_size > 59 else 0
    return blocks * 4096, inodes + 1


def fs_size(used: int, inodes: int, slot: int) -> int:
    """The rootfs image's size: what the files take plus ext4's overhead, at most the slot. The rootfs is
    read-only, so free space in it is only waste: the bundle is smaller and installs faster."""
    want = int(used * FS_OVERHEAD) + inodes * 256 + FS_EXTRA
    want = -(-want // FS_ALIGN) * FS_ALIGN
    if want > slot:
        raise ImageBuildError(
            f"the root filesystem needs about {want >> 20} MiB, a slot has {slot >> 20} MiB: "
            "raise partitions.rootfs in the recipe or install less"
        )
    return want


@dataclass(frozen=True)
class Rootfs:
    image: Path
    base_reused: bool
    system_reused: bool
    packages: list[str]  # "name version" of every installed Debian package
    base_key: str
    system_key: str
    system_tree: Path | None = None  # the cached system tree the image was made from

    def grub_modules(self, arch: str) -> Path | None:
        """GRUB's modules for the ESP from the image's own tree (GRUB_MODULES_IN_TREE), None where the build
        host's are used (x86_64)."""
        rel = GRUB_MODULES_IN_TREE.get(arch)
        if rel is None or self.system_tree is None:
            return None
        d = self.system_tree / rel
        if not (d / "moddep.lst").is_file():
            raise ImageBuildError(f"the image's rootfs has no GRUB modules in /{rel} (package {ARCH_PACKAGES[arch]})")
        return d


def installed_packages(tree: Path) -> list[str]:
    out = run(["chroot", tree, "dpkg-query", "-W", "-f", "${Package} ${Version}\\n"]).text
    return sorted(ln for ln in out.splitlines() if ln)


@dataclass(frozen=True)
class TreeInputs:
    """What the rootfs stages take besides the recipe."""

    cache: Cache
    keyring_pem: bytes
    wheels: Path  # pitstop's wheel and its dependencies' (`wheelhouse`)
    epoch: int
    pinned: bool = True
    refresh: bool = False
    extra_overlay: Path | None = None  # applied after the recipe's (a development image's test hooks)
    on_stage: Callable[[str, bool], None] | None = None  # called as the base and system stages finish


@contextlib.contextmanager
def rootfs_tree(recipe: Recipe, inputs: TreeInputs) -> Iterator[tuple[Path, Stage, System]]:
    """The rootfs of `recipe` as a directory tree (the base and system stages, built or reused, then the
    overlays), with the two stages it came from; removed when the context ends. Files are hard links into the
    cached system tree: replace them, never write into them."""
    if os.geteuid() != 0:
        raise ImageBuildError("building a rootfs needs root (mmdebstrap --mode=root, chroot)")
    i = inputs
    base = build_base(recipe, i.cache, i.epoch, pinned=i.pinned, refresh=i.refresh)
    if i.on_stage:
        i.on_stage("base", base.reused)
    system = build_system(
        recipe, i.cache, base, keyring_pem=i.keyring_pem, wheels=i.wheels, epoch=i.epoch, pinned=i.pinned
    )
    if i.on_stage:
        i.on_stage("system", system.reused)
    # Beside the cached system tree (hard links need the same filesystem), removed whatever happens.
    work = i.cache.root / "work"
    work.mkdir(parents=True, exist_ok=True)
    tree = Path(tempfile.mkdtemp(prefix="rootfs-", dir=work)) / "tree"
    try:
        link_copy(system.path, tree)
        for overlay in (recipe.files.overlay, i.extra_overlay):
            if overlay is not None:
                copy_overlay(overlay, tree)
        yield tree, base, system
    finally:
        shutil.rmtree(tree.parent)


def make_rootfs_image(recipe: Recipe, tree: Path, out: Path, *, epoch: int) -> None:
    """`tree` as the rootfs image `out`: ext4 sized to its content, at most a slot (ImageBuildError if larger)."""
    used, inodes = tree_usage(tree)
    ext4.make_ext4(
        out,
        fs_size(used, inodes, recipe.partitions.rootfs),
        tree,
        label=ROOTFS_LABEL,
        uuid=partitions.identity_uuid(recipe.identity, "fs:rootfs"),
        epoch=epoch,
    )


def build_rootfs(recipe: Recipe, out: Path, inputs: TreeInputs) -> Rootfs:
    """The rootfs image of `recipe` at `out`: ext4, sized to its content (at most a slot)."""
    with rootfs_tree(recipe, inputs) as (tree, base, system):
        make_rootfs_image(recipe, tree, out, epoch=inputs.epoch)
    return Rootfs(out, base.reused, system.reused, system.packages, base.key, system.key, system.path)
