"""Recipes (`recipes/*.toml`): what an image is made of. docs/recipes.md is the reference.

One declarative table (`RECIPE`, a tree of `Table`s of `Setting`s) drives everything: TOML parsing, validation,
the JSON form (`to_json` / `from_json`, which round-trip) and the reference table in docs/recipes.md
(`render_docs`). The parsed recipe is a tree of frozen dataclasses whose fields are the table's keys.

Every problem is found before anything is built and reported as one `RecipeError` naming the file, the key
(`partitions.esp`, `user[2].ssh_keys[1]`: list positions count from 1) and what is allowed. Paths in a recipe
are relative to the recipe file; the parsed recipe holds them absolute.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pitstop import docgen
from pitstop.image import jetson
from pitstop.image import partitions as parts
from pitstop.image.errors import RecipeError
from pitstop.image.settings import (
    Ctx,
    Flag,
    Integer,
    ListOf,
    PathKind,
    Problems,
    Section,
    Sections,
    Setting,
    Size,
    Table,
    Text,
    table_markdown,
    tables,
)
from pitstop.image.sizes import MiB, format_size
from pitstop.ota.clock import ClockPolicy
from pitstop.ota.errors import BundleError, KeyringError
from pitstop.ota.keyring import load_keyring
from pitstop.ota.manifest import COMPATIBLE_RE, MODEL_DESCRIPTION_FILE, check_name, check_semver, check_target
from pitstop.ota.system_config import MAX_TRIES, NVBOOTCTRL_MAX_TRIES

DEV_KEYRING = "dev"
DATA_MIN = 16 * MiB
HOSTNAME_FIELDS = ("device_id",)
_MAX_RECIPE = 1 << 20


# --- the parsed recipe --------------------------------------------------------------------------------------
# Field names are the TOML keys; `Table`s below say how each is read, checked, written to JSON and documented.


@dataclass(frozen=True)
class Target:
    arch: str
    board: str
    bootloader: str
    compatible: str


@dataclass(frozen=True)
class Base:
    suite: str
    mirror: str
    security_mirror: str
    snapshot: str | None
    components: tuple[str, ...]


@dataclass(frozen=True)
class Packages:
    include: tuple[str, ...]


@dataclass(frozen=True)
class Partitions:
    esp: int
    rootfs: int
    data: int | None  # None: the rest of the disk ("fill")
    disk: int | None  # None: just large enough


@dataclass(frozen=True)
class Boot:
    cmdline: str
    tries: int
    emergency_reboot_s: int  # 0: systemd's own emergency shell


@dataclass(frozen=True)
class System:
    hostname: str
    timezone: str
    persistent_journal: bool


@dataclass(frozen=True)
class Ssh:
    password_authentication: bool
    permit_root_login: str


@dataclass(frozen=True)
class User:
    name: str
    uid: int | None
    groups: tuple[str, ...]
    shell: str
    ssh_keys: tuple[Path, ...]


@dataclass(frozen=True)
class Interface:
    match: str
    dhcp: bool
    address: tuple[str, ...]
    gateway: str | None
    dns: tuple[str, ...]


@dataclass(frozen=True)
class Network:
    ntp: tuple[str, ...]
    interface: tuple[Interface, ...]


@dataclass(frozen=True)
class Files:
    overlay: Path | None


@dataclass(frozen=True)
class Daemon:
    enable: bool
    config: Path | None


@dataclass(frozen=True)
class Keys:
    keyring: Path | str  # a PEM file or directory, or DEV_KEYRING
    clock: str

    @property
    def development(self) -> bool:
        return self.keyring == DEV_KEYRING


@dataclass(frozen=True)
class Bundle:
    version: str
    security_version: int


@dataclass(frozen=True)
class Model:
    name: str
    source: Path
    target: str
    description_file: Path | None = None  # the model description (TOML), stored in its model.json

    def description(self) -> dict[str, Any] | None:
        """The description file's content (checked as TOML when the recipe was read)."""
        if self.description_file is None:
            return None
        try:
            return tomllib.loads(self.description_file.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise RecipeError(f"model {self.name}: description_file {self.description_file}: {e}") from None


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    target: Target
    base: Base
    packages: Packages
    partitions: Partitions
    boot: Boot
    system: System
    ssh: Ssh
    user: tuple[User, ...]
    network: Network
    files: Files
    daemon: Daemon
    keys: Keys
    bundle: Bundle
    model: tuple[Model, ...]

    @property
    def identity(self) -> str:
        """What the image's identifiers derive from (image/partitions.py)."""
        return self.target.compatible

    def layout(self) -> parts.Layout:
        p = self.partitions
        return parts.plan(
            esp=p.esp, rootfs=p.rootfs, data=p.data, disk=p.disk, arch=self.target.arch, identity=self.identity
        )

    def files_used(self) -> list[Path]:
        """Every file or directory the recipe names (for cache keys and build manifests)."""
        out: list[Path] = [k for u in self.user for k in u.ssh_keys]
        out += [m.source for m in self.model]
        out += [m.description_file for m in self.model if m.description_file is not None]
        out += [p for p in (self.files.overlay, self.daemon.config) if p is not None]
        if isinstance(self.keys.keyring, Path):
            out.append(self.keys.keyring)
        return out


# --- kinds of values ----------------------------------------------------------------------------------------


# --- rules --------------------------------------------------------------------------------------------------

_NAME_RULE = "lower-case letters, digits, '.', '_', '-'; starts with a letter or digit; at most 64"
_NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
_URL_PATTERN = r"https?://[^\s\"'\\]+"
_PACKAGE_PATTERN = r"[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:-]+)?"
_USER_PATTERN = r"[a-z_][a-z0-9_-]{0,31}"
_HOST_PATTERN = r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?"
# Debian's base-passwd users and groups, and accounts the image's packages create: a login of that name
# would clash (useradd refuses a name whose group exists, e.g. "operator").
_RESERVED_USERS = frozenset(
    [
        "root",
        "daemon",
        "bin",
        "sys",
        "sync",
        "games",
        "man",
        "lp",
        "mail",
        "news",
        "uucp",
        "proxy",
        "www-data",
        "backup",
        "list",
        "irc",
        "gnats",
        "nobody",
        "_apt",
        "adm",
        "tty",
        "disk",
        "kmem",
        "dialout",
        "fax",
        "voice",
        "cdrom",
        "floppy",
        "tape",
        "sudo",
        "audio",
        "dip",
        "operator",
        "src",
        "shadow",
        "utmp",
        "video",
        "sasl",
        "plugdev",
        "staff",
        "users",
        "nogroup",
        "input",
        "sgx",
        "kvm",
        "render",
        "messagebus",
        "sshd",
        "pitstop",
        "_chrony",
        "polkitd",
        "netdev",
    ]
)
_SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
_SSH_KEY_RE = re.compile(r"(?:^|\s)(" + "|".join(map(re.escape, _SSH_KEY_TYPES)) + r")\s+AAAA[A-Za-z0-9+/]+=*(\s|$)")


def _compatible(value: str) -> str | None:
    if COMPATIBLE_RE.fullmatch(value):
        return None
    return f"{value!r} is not allowed: 1-128 printable ASCII characters without spaces"


def _cmdline(value: str) -> str | None:
    bad = sorted({c for c in value if c in "\"'$\\;{}\n\r\t" or not c.isprintable()})
    if bad:
        return f"may not contain {' '.join(map(repr, bad))} (it is set in a GRUB script)"
    args = value.split()
    for a in args:
        for ours in ("root=", "pitstop.slot="):
            if a.startswith(ours):
                return f"may not set {ours}…: the image's GRUB configuration sets it per slot"
    panics = [a.split("=", 1)[1] for a in args if a.startswith("panic=")]
    if not panics or not panics[-1].isdigit() or int(panics[-1]) == 0:
        return (
            "needs panic=N with N > 0 (seconds): Debian kernels hang on a panic by default, which would stop "
            "the boot counter (docs/grub.md)"
        )
    return None


def render_hostname(pattern: str, device_id: str) -> str:
    """The hostname of the device `device_id`: {device_id} replaced (lower case, '.' and '_' as '-'), at most
    63 characters, no '-' at either end."""
    safe = re.sub(r"[^a-z0-9-]", "-", device_id.lower())
    name = pattern.replace("{device_id}", safe)[:63]
    return name.strip("-") or "pitstop"


def _hostname(value: str) -> str | None:
    fields = re.findall(r"\{([^}]*)\}", value)
    unknown = [f for f in fields if f not in HOSTNAME_FIELDS]
    if unknown:
        return f"unknown field {{{unknown[0]}}} (allowed: {', '.join('{' + f + '}' for f in HOSTNAME_FIELDS)})"
    bare = value.replace("{device_id}", "x")
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", bare):
        return (
            f"{value!r} is not allowed: a host name of lower-case letters, digits and '-' (not first or last), "
            "at most 63, with the optional field {device_id}"
        )
    return None


def _user_name(value: str) -> str | None:
    if value in _RESERVED_USERS or value.startswith("systemd-"):
        return f"{value!r} is a system account or group the image defines itself; choose another name"
    return None


def _ip(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"{value!r} is not an IP address"
    return None


def _cidr(value: str) -> str | None:
    if "/" not in value:
        return f"{value!r} needs a prefix length, e.g. 192.168.1.10/24"
    try:
        ipaddress.ip_interface(value)
    except ValueError:
        return f"{value!r} is not an address with a prefix length"
    return None


def _ssh_keys_file(path: Path) -> str | None:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        return f"cannot read: {e}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        return "holds no public key"
    for n, line in enumerate(lines, start=1):
        if not _SSH_KEY_RE.search(line):
            return (
                f"key {n} is not an OpenSSH public key line ({', '.join(_SSH_KEY_TYPES[:3])}…); "
                "give the .pub file, never a private key"
            )
    return None


def _keyring(path: Path) -> str | None:
    try:
        load_keyring(path)
    except KeyringError as e:
        return e.message
    return None


def _toml_file(path: Path) -> str | None:
    # Its keys are the daemon's: the system stage has the image's own pitstop check them (`pitstop daemon --check`).
    try:
        tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        return f"cannot read: {e}"
    except tomllib.TOMLDecodeError as e:
        return f"not valid TOML: {e}"
    return None


def _semver(value: str) -> str | None:
    try:
        check_semver(value)
    except BundleError as e:
        return e.message
    return None


def _model_name(value: str) -> str | None:
    try:
        check_name(value)
    except BundleError as e:
        return e.message
    return None


def _model_target(value: str) -> str | None:
    try:
        check_target("model", value)
    except BundleError as e:
        return e.message
    if value == "pitstop" or value.startswith(("pitstop/", "identity/", "lost+found")):
        return f"{value!r} is reserved on the data partition (pitstop/, identity/, lost+found)"
    return None


# --- the table ----------------------------------------------------------------------------------------------


def _check_interface(i: Interface) -> Problems:
    if not i.dhcp and not i.address:
        return [("address", "is required when dhcp = false")]
    if i.gateway is not None and not i.address:
        return [("gateway", "needs a static address")]
    return []


def _check_jetson(r: Recipe) -> Problems:
    """A Jetson recipe (bootloader nvbootctrl) and a GRUB one cannot be mixed up: the board decides."""
    t, p = r.target, r.partitions
    if t.bootloader != "nvbootctrl":
        if t.board in jetson.BOARDS:
            return [("target.bootloader", f'{t.board} boots through NVIDIA\'s UEFI: bootloader = "nvbootctrl"')]
        return []
    if t.board not in jetson.BOARDS:
        return [("target.board", f"with nvbootctrl the board is a Jetson: {', '.join(sorted(jetson.BOARDS))}")]
    if t.arch != "arm64":
        return [("target.arch", f"{t.board} is arm64")]
    if r.boot.tries > NVBOOTCTRL_MAX_TRIES:
        return [
            (
                "boot.tries",
                f"{r.boot.tries}: NVIDIA's firmware counts 1 to {NVBOOTCTRL_MAX_TRIES} tries (ROOTFS_RETRY_COUNT_MAX)",
            )
        ]
    if p.data is None:
        return [("partitions.data", "a Jetson's data partition (UDA) needs a size; NVIDIA's layout has no fill")]
    if p.disk is not None:
        return [("partitions.disk", "not for a Jetson: NVIDIA's tools lay out the device's storage")]
    return []


def _check_recipe(r: Recipe) -> Problems:
    p = r.partitions
    f = format_size
    jetson_problems = _check_jetson(r)
    if jetson_problems or r.target.bootloader == "nvbootctrl":
        return jetson_problems
    if p.data is None:
        if p.disk is None:
            return [("partitions.data", '"fill" needs partitions.disk (the size to fill)')]
        left = parts.fill_size(p.disk, p.esp, p.rootfs)
        if left < DATA_MIN:
            return [
                (
                    "partitions.disk",
                    f"{f(p.disk)} is too small: esp {f(p.esp)} + 2 x rootfs {f(p.rootfs)} + "
                    f"2MiB for the GPT leave {f(max(left, 0))} for data (at least {f(DATA_MIN)})",
                )
            ]
    elif p.disk is not None:
        need = parts.required_disk_size(p.esp, p.rootfs, p.data)
        if need > p.disk:
            return [
                (
                    "partitions.disk",
                    f"{f(p.disk)} is too small: esp {f(p.esp)} + 2 x rootfs {f(p.rootfs)} + "
                    f"data {f(p.data)} + 2MiB for the GPT = {f(need)}",
                )
            ]
    problems: Problems = []
    for what, items in (
        ("user", [u.name for u in r.user]),
        ("model", [m.name for m in r.model]),
        ("network.interface", [i.match for i in r.network.interface]),
    ):
        seen: set[str] = set()
        for n, v in enumerate(items, start=1):
            if v in seen:
                problems.append((f"{what}[{n}]", f"{v!r} appears twice"))
            seen.add(v)
    targets = [m.target for m in r.model]
    for n, t in enumerate(targets, start=1):
        clash = overlapping_target(t, targets[: n - 1])
        if clash is not None:
            problems.append((f"model[{n}].target", f"{t!r} overlaps the target {clash!r} of another model"))
    return problems[:1]


def overlapping_target(target: str, others: list[str]) -> str | None:
    """The first of `others` that is `target`, lies inside it or contains it: two models cannot share a path."""
    return next((o for o in others if o == target or o.startswith(target + "/") or target.startswith(o + "/")), None)


def _model_finish(m: Model) -> Model:
    return m if m.target else dataclasses.replace(m, target=f"models/{m.name}")


def _check_model(m: Model) -> Problems:
    problem = _model_target(m.target)
    if problem:
        return [("target", problem)]
    if m.source.name == MODEL_DESCRIPTION_FILE:
        return [("source", f"a model file may not be named {MODEL_DESCRIPTION_FILE} (the description is)")]
    return []


TARGET = Table(
    "target",
    Target,
    (
        Setting(
            "arch",
            Text(allowed=("x86_64", "arm64")),
            "CPU architecture of the device: `x86_64`, or `arm64` (64-bit ARM with UEFI: QEMU's virt machine, "
            'arm64 servers and boards; built on an x86_64 host through qemu-user, docs/image.md "arm64").',
            "x86_64",
        ),
        Setting(
            "board",
            Text(_NAME_RULE, _NAME_PATTERN),
            "Board name, recorded in the build manifest. With `nvbootctrl`, the Jetson to flash: "
            "`jetson-orin-nano-devkit` or `jetson-agx-orin-devkit` (docs/jetson-flashing.md).",
            "generic-uefi",
        ),
        Setting(
            "bootloader",
            Text(allowed=("grub", "nvbootctrl")),
            "Boot loader and boot-slot backend: `grub` is a standalone UEFI "
            "GRUB with the A/B boot counter of docs/grub.md; `nvbootctrl` is a Jetson's own UEFI with "
            "rootfs A/B (arm64, a Jetson `board`): the build makes the rootfs and NVIDIA's flashing "
            "configuration (docs/jetson-flashing.md).",
            "grub",
        ),
        Setting(
            "compatible",
            Text("1-128 printable ASCII characters, no spaces", check=_compatible),
            "What the device is: written to system.toml, put into the first "
            "bundle; a bundle installs only on a device with the same string. Also the seed of the image's "
            "partition and filesystem UUIDs.",
        ),
    ),
    "The device the image is for.",
)

BASE = Table(
    "base",
    Base,
    (
        Setting("suite", Text(allowed=("bookworm",)), "Debian release (Debian 12).", "bookworm"),
        Setting(
            "mirror", Text("an http:// or https:// URL", _URL_PATTERN), "Debian mirror.", "http://deb.debian.org/debian"
        ),
        Setting(
            "security_mirror",
            Text("an http:// or https:// URL", _URL_PATTERN),
            "Debian security mirror.",
            "http://deb.debian.org/debian-security",
        ),
        Setting(
            "snapshot",
            Text("a snapshot.debian.org timestamp, YYYYMMDDTHHMMSSZ", r"\d{8}T\d{6}Z"),
            "Take every package from snapshot.debian.org as of this time instead of the mirrors: the same versions "
            "on every build (reproducible builds need it).",
            None,
        ),
        Setting(
            "components",
            ListOf(Text(allowed=("main", "contrib", "non-free", "non-free-firmware"))),
            "Archive components.",
            ("main",),
        ),
    ),
    "The Debian base system (mmdebstrap).",
)

PACKAGES = Table(
    "packages",
    Packages,
    (
        Setting(
            "include",
            ListOf(Text("a Debian package name, optionally =VERSION", _PACKAGE_PATTERN)),
            "Debian packages installed on top of the minimal base. Always installed too: initramfs-tools, "
            "systemd, systemd-sysv, udev, dbus, e2fsprogs, dosfstools, python3, python3-venv, and the "
            "architecture's kernel (`linux-image-amd64`, `linux-image-arm64`) unless a `linux-image-*` package is "
            "listed here; on arm64 also `grub-efi-arm64-bin` (the ESP's GRUB is built from its modules).",
            (),
        ),
    ),
    "Debian packages.",
)

PARTITIONS = Table(
    "partitions",
    Partitions,
    (
        Setting(
            "esp",
            Size(min=16 * MiB),
            "EFI system partition (FAT): the GRUB binary, its configuration and grubenv. Not used with "
            "`nvbootctrl` (NVIDIA's layout has its own `esp`).",
            64 * MiB,
        ),
        Setting(
            "rootfs",
            Size(min=16 * MiB),
            "Size of each of the two root filesystem slots (`rootfs_a`, "
            "`rootfs_b`; a Jetson's `APP` and `APP_b`, NVIDIA's `-S`); the rootfs image of every future update "
            "must fit.",
        ),
        Setting(
            "data",
            Size(min=DATA_MIN, fill=True),
            'Data partition (ext4, kept across updates: state, models, logs, identity); `"fill"`: the rest of `disk`. '
            "On a Jetson: the size of NVIDIA's `UDA` partition (made ext4 at first boot); no `fill`.",
        ),
        Setting(
            "disk",
            Size(min=64 * MiB),
            "Whole disk image size; default: just large enough. Partitions must fit, "
            "with 1 MiB before the first and after the last (GPT). Not with `nvbootctrl`: NVIDIA's tools lay "
            "out a Jetson's storage.",
            None,
        ),
    ),
    "Partition sizes. The layout is always `esp`, `rootfs_a`, `rootfs_b`, `data` (GPT, in this order).",
)

BOOT = Table(
    "boot",
    Boot,
    (
        Setting(
            "cmdline",
            Text(
                "no quotes, `$`, `\\`, `;` or braces; no `root=`, `pitstop.slot=`; `panic=N` with N > 0", check=_cmdline
            ),
            "Extra kernel command line (the builder adds `root=`, `ro` and "
            "`pitstop.slot=`). Must hold `panic=N` with N > 0. Not used with `nvbootctrl`: a Jetson's command "
            "line is L4T's (`/boot/extlinux/extlinux.conf` from NVIDIA's packages, and UEFI).",
            "console=tty0 console=ttyS0,115200 panic=5",
        ),
        Setting(
            "tries",
            Integer(1, MAX_TRIES),
            "Boot attempts a newly installed slot gets before GRUB falls back (system.toml `[bootloader] tries`). "
            "With `nvbootctrl`: 1 to 3, flashed as NVIDIA's `ROOTFS_RETRY_COUNT_MAX`.",
            3,
        ),
        Setting(
            "emergency_reboot_s",
            Integer(0, 600),
            "Seconds a device in systemd's emergency or rescue mode (a required mount failed, a unit isolated "
            "`emergency.target`) shows why on the console before it reboots, so that a failing slot spends its "
            "tries and GRUB falls back; systemd's own shell there waits forever for a root password that a locked "
            "root never accepts. `0`: keep that shell (a device whose console someone can log in on).",
            30,
        ),
    ),
    "Booting.",
)

SYSTEM = Table(
    "system",
    System,
    (
        Setting(
            "hostname",
            Text("lower-case letters, digits, `-`, the field `{device_id}`; at most 63", check=_hostname),
            "Host name; `{device_id}` is replaced by the device id written at "
            "provisioning (lower case, `.` and `_` as `-`); `unprovisioned` until then.",
            "pitstop-{device_id}",
        ),
        Setting(
            "timezone",
            Text("a tz database name such as Europe/Berlin", r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*"),
            "Time zone.",
            "Etc/UTC",
        ),
        Setting(
            "persistent_journal",
            Flag(),
            "Keep the systemd journal on the data partition (`/data/log/journal`) instead of in memory.",
            True,
        ),
    ),
    "The running system.",
)

SSH = Table(
    "ssh",
    Ssh,
    (
        Setting(
            "password_authentication",
            Flag(),
            "Allow SSH logins with a password (users have none unless the overlay sets one).",
            False,
        ),
        Setting("permit_root_login", Text(allowed=("no", "prohibit-password")), "sshd `PermitRootLogin`.", "no"),
    ),
    "OpenSSH server.",
)

USER = Table(
    "user",
    User,
    (
        Setting(
            "name",
            Text(
                "lower-case letters, digits, '_', '-'; starts with a letter or '_'; at most 32",
                _USER_PATTERN,
                check=_user_name,
            ),
            "Login name.",
        ),
        Setting("uid", Integer(1000, 59999), "User id; default: the next free one from 1000.", None),
        Setting(
            "groups", ListOf(Text("a group name", _USER_PATTERN)), "Supplementary groups (e.g. `sudo`, `adm`).", ()
        ),
        Setting("shell", Text("an absolute path", r"/[^\s]*"), "Login shell.", "/bin/bash"),
        Setting(
            "ssh_keys",
            ListOf(PathKind("file", check=_ssh_keys_file)),
            "Public key files (OpenSSH `.pub` format, one or more keys each) for the user's `authorized_keys`.",
            (),
        ),
    ),
    "A login account (repeat `[[user]]`). No passwords: accounts are locked, SSH keys only.",
)

INTERFACE = Table(
    "interface",
    Interface,
    (
        Setting(
            "match",
            Text("a network interface name or glob, e.g. enp1s0 or en*", r"[A-Za-z0-9*?._:\[\]-]{1,64}"),
            "Interfaces this applies to (systemd-networkd `[Match] Name=`).",
        ),
        Setting("dhcp", Flag(), "Configure by DHCP (IPv4 and IPv6).", True),
        Setting(
            "address",
            ListOf(Text("address/prefix, e.g. 192.168.1.10/24", check=_cidr)),
            "Static addresses with prefix length.",
            (),
        ),
        Setting("gateway", Text("an IP address", check=_ip), "Default gateway (with a static address).", None),
        Setting("dns", ListOf(Text("IP addresses", check=_ip)), "DNS servers.", ()),
    ),
    "One systemd-networkd configuration (repeat `[[network.interface]]`).",
    _check_interface,
)

NETWORK = Table(
    "network",
    Network,
    (
        Setting(
            "ntp",
            ListOf(Text("a host name or IP address", _HOST_PATTERN)),
            "NTP servers added to chrony's sources (Debian's pool stays unless the overlay replaces "
            "`/etc/chrony/chrony.conf`).",
            (),
        ),
        Setting("interface", Sections(INTERFACE), "Interface configurations, first match wins.", ()),
    ),
    "Networking (systemd-networkd) and time (chrony).",
)

FILES = Table(
    "files",
    Files,
    (
        Setting(
            "overlay",
            PathKind("directory"),
            "A directory copied over the root filesystem at the end (owner root, modes kept); it may not "
            "write through a symlink of the image nor put a file where the image has a directory.",
            None,
        ),
    ),
    "Files added to the image.",
)

DAEMON = Table(
    "daemon",
    Daemon,
    (
        Setting(
            "enable",
            Flag(),
            "Start the pitstop daemon (`pitstop.service`) at boot. It commits the booted slot (after the health "
            "gate when it is new) and then prints `PITSTOP-READY slot=<s>` on the console.",
            True,
        ),
        Setting(
            "config",
            PathKind("file", check=_toml_file),
            "The daemon's configuration (TOML), installed as `/etc/pitstop/pitstop.toml`; the image's own pitstop "
            "checks it during the build (`pitstop daemon --check`).",
            None,
        ),
    ),
    "The pitstop daemon.",
)

KEYS = Table(
    "keys",
    Keys,
    (
        Setting(
            "keyring",
            PathKind("file or directory", special=(DEV_KEYRING,), check=_keyring),
            "Trusted root "
            "certificate(s) for bundles (a PEM file or a directory of them), installed as "
            f'`/etc/pitstop/keyring.pem`. `"{DEV_KEYRING}"`: a development PKI the builder creates once and keeps '
            "(never for production).",
        ),
        Setting(
            "clock",
            Text(allowed=tuple(c.value for c in ClockPolicy)),
            "Certificate time policy (system.toml `clock`).",
            ClockPolicy.FLOOR.value,
        ),
    ),
    "Trust.",
)

BUNDLE = Table(
    "bundle",
    Bundle,
    (
        Setting(
            "version",
            Text("a semantic version, MAJOR.MINOR.PATCH", check=_semver),
            "Version of the image's rootfs and of its first bundle (semantic version).",
        ),
        Setting(
            "security_version",
            Integer(0, 2**63 - 1),
            "Anti-rollback level of the first bundle; the image starts "
            "with it as the floor, so older bundles are refused.",
            0,
        ),
    ),
    "The first bundle (the image's own rootfs as an update).",
)

MODEL = Table(
    "model",
    Model,
    (
        Setting(
            "name",
            Text("letters, digits, `.`, `_`, `-`; at most 64", check=_model_name),
            "Model name (as a bundle payload name).",
        ),
        Setting("source", PathKind("file"), "The model file."),
        Setting(
            "target",
            Text("a relative path, not under `pitstop/` or `identity/`", check=_model_target),
            "Where it lives under the data partition, as a model payload with this target would put it.",
            "",
            "`models/<name>`",
        ),
        Setting(
            "description_file",
            PathKind("file", check=_toml_file),
            "The model description (TOML, docs/model-description.md), kept in the installed model's `model.json` "
            "as a model payload's `description_file` is: the daemon's loops read it from there. Without it a loop "
            "runs the model only if a `<model>.toml` lies beside it, which a preloaded model never has.",
            None,
        ),
    ),
    "A model preloaded on the data partition (repeat `[[model]]`), as if installed by a bundle.",
    _check_model,
    _model_finish,
)

RECIPE = Table(
    "",
    Recipe,
    (
        Setting("name", Text(_NAME_RULE, _NAME_PATTERN), "Image name: output file names."),
        Setting("description", Text(), "Free text.", ""),
        Setting("target", Section(TARGET), "The device."),
        Setting("base", Section(BASE), "Debian base."),
        Setting("packages", Section(PACKAGES), "Packages."),
        Setting("partitions", Section(PARTITIONS), "Partition sizes."),
        Setting("boot", Section(BOOT), "Booting."),
        Setting("system", Section(SYSTEM), "The running system."),
        Setting("ssh", Section(SSH), "OpenSSH server."),
        Setting("user", Sections(USER), "Login accounts.", ()),
        Setting("network", Section(NETWORK), "Networking."),
        Setting("files", Section(FILES), "Files."),
        Setting("daemon", Section(DAEMON), "The pitstop daemon."),
        Setting("keys", Section(KEYS), "Trust."),
        Setting("bundle", Section(BUNDLE), "The first bundle."),
        Setting("model", Sections(MODEL), "Preloaded models.", ()),
    ),
    "The top level.",
    _check_recipe,
)


def _check_tables(table: Table) -> None:
    fields = [f.name for f in dataclasses.fields(table.cls)]
    keys = [s.key for s in table.settings]
    if fields != keys:
        raise AssertionError(f"recipe table {table.name or 'top'}: keys {keys} != fields of {table.cls.__name__}")
    for s in table.settings:
        if isinstance(s.kind, (Section, Sections)):
            _check_tables(s.kind.table)


_check_tables(RECIPE)


# --- loading ------------------------------------------------------------------------------------------------


def parse(text: str, path: Path) -> Recipe:
    """A recipe from TOML text; relative paths are relative to `path`'s directory."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    base = Path(os.path.abspath(path)).parent
    recipe: Recipe = RECIPE.parse(raw, Ctx(str(path), base), "")
    return recipe


def load(path: Path) -> Recipe:
    """Read and validate a recipe file; RecipeError for anything wrong, before anything is built."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_RECIPE + 1)
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe: {e.strerror}") from None
    if len(data) > _MAX_RECIPE:
        raise RecipeError(f"{path}: larger than 1 MiB; not a recipe")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text") from None
    return parse(text, path)


def to_json(recipe: Recipe) -> dict[str, Any]:
    """The recipe with every default filled in, sizes in bytes and paths absolute."""
    return RECIPE.dump(recipe)


def from_json(data: object, where: str = "JSON") -> Recipe:
    """The inverse of `to_json`; validated like a recipe file (the files it names must exist)."""
    recipe: Recipe = RECIPE.parse(data, Ctx(where, Path("/")), "")
    return recipe


def dumps(recipe: Recipe) -> str:
    return json.dumps(to_json(recipe), indent=2, sort_keys=True) + "\n"


# --- docs ---------------------------------------------------------------------------------------------------


def render_docs() -> str:
    """The reference section of docs/recipes.md, generated from the table."""
    out = ["### Top level", "", *table_markdown(RECIPE), ""]
    for name, table, array in tables(RECIPE):
        out += [f"### `[[{name}]]`" if array else f"### `[{name}]`", "", table.doc, "", *table_markdown(table), ""]
    return "\n".join(out)


DOCS_BEGIN = docgen.begin_marker("image/recipe.py", "pitstop.image.recipe", "docs/recipes.md")


def splice_docs(doc: str) -> str:
    """`doc` (docs/recipes.md) with its generated section replaced by `render_docs()`."""
    return docgen.splice(doc, DOCS_BEGIN, render_docs())


def main(argv: Sequence[str] | None = None) -> int:
    return docgen.main(argv, "pitstop.image.recipe", "docs/recipes.md", splice_docs)


if __name__ == "__main__":
    raise SystemExit(main())
