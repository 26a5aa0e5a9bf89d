"""The HIL rig as a pytest plugin: `pytest hil/ --target qemu` (hil/conftest.py loads it), or `-p pitstop.hil.plugin`
anywhere else. docs/hil.md describes the options, fixtures and report.

Fixtures:

- `rig` (session): the run: `rig.run_dir`, `rig.report` (`rig.figure(...)`), `rig.provision(...)`,
  `rig.power_cuts`, `rig.seed`;
- `rig_image` (session): the image under test and what came with it (first bundle, recipe, dev keys): `--image`,
  or built once and cached; `image` (session): `rig_image.disk`;
- `target` (function): `target_factory("dut")`; `target_factory`: `target_factory("dut-2")` for another device
  (QEMU and local targets; a real bench has one);
- `power_cuts` (session): `--power-cuts N`; `rng` (function): a `random.Random` seeded from `--seed` and the
  test's id, so random points can be replayed.

Each device is torn down after its test whatever the outcome (power cut, console closed, QEMU reaped), and its
timeline, serial log and artifacts go into the report. `@pytest.mark.hil(needs=["network"])` skips a test whose
target cannot do what it needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import socket
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import pitstop
from pitstop.errors import UsageError
from pitstop.hil.errors import HilError
from pitstop.hil.local_target import BOOT, LocalTarget
from pitstop.hil.overlay import rig_models, write_rig_overlay
from pitstop.hil.power import CommandPower, HttpPdu, PowerControl, parse_auth, relay_from_spec
from pitstop.hil.qemu_target import QemuConfig, QemuTarget, qemu_missing
from pitstop.hil.report import Report
from pitstop.hil.ssh_target import SshConfig, SshTarget, parse_ssh_url
from pitstop.hil.target import Provision, Target, rig_factory_ca
from pitstop.hil.timeline import Clock
from pitstop.image.recipe import Model

DEFAULT_RECIPE = Path("recipes") / "ipc-x86_64.toml"
DEFAULT_EPOCH = 1_700_000_000  # SOURCE_DATE_EPOCH of the rig's image when none is set: reproducible, cacheable
MARKER = (
    "hil(needs=[...]): a HIL rig scenario; needs: what the target must be able to do "
    "(flash, power, network, shell, console)"
)


@dataclass(frozen=True)
class RigOptions:
    target: str = "qemu"
    image: Path | None = None
    rebuild_image: bool = False
    power_cuts: int = 3
    seed: int | None = None
    rig_dir: Path | None = None
    limit: float = 3600.0
    keep_disks: str = "failed"
    # QEMU
    accel: str = "auto"
    memory_mib: int = 1024
    cpus: int = 1
    grow_mib: int = 1024
    # a real device
    console: str | None = None
    power_on: str | None = None
    power_off: str | None = None
    pdu_on: str | None = None
    pdu_off: str | None = None
    pdu_outlet: str = ""
    pdu_method: str = "POST"
    pdu_auth: str | None = None
    relay: str | None = None
    net_down: str | None = None
    net_up: str | None = None
    flash_device: Path | None = None
    flash_command: str | None = None
    flash_before: str | None = None
    flash_after: str | None = None
    ssh_key: Path | None = None
    host_address: str | None = None
    boot_command: str = BOOT  # --target local

    @classmethod
    def from_config(cls, config: pytest.Config) -> RigOptions:
        g = config.getoption
        return cls(**{f: g(f"hil_{f}") for f in cls.__dataclass_fields__})

    def power(self) -> PowerControl | None:
        kinds = [bool(self.power_on or self.power_off), bool(self.pdu_on or self.pdu_off), bool(self.relay)]
        if sum(kinds) > 1:
            raise UsageError("one power control: --power-on/--power-off, --pdu-on/--pdu-off or --relay")
        if self.power_on or self.power_off:
            if not (self.power_on and self.power_off):
                raise UsageError("--power-on and --power-off go together")
            return CommandPower(self.power_on, self.power_off)
        if self.pdu_on or self.pdu_off:
            if not (self.pdu_on and self.pdu_off):
                raise UsageError("--pdu-on and --pdu-off go together")
            auth = self.pdu_auth or os.environ.get("PITSTOP_HIL_PDU_AUTH")
            return HttpPdu(
                self.pdu_on, self.pdu_off, self.pdu_outlet, self.pdu_method, parse_auth(auth) if auth else None
            )
        if self.relay:
            return relay_from_spec(self.relay)
        return None

    def check(self) -> None:
        """UsageError for options that do not fit together, before any test runs."""
        if self.target not in ("qemu", "local"):
            if not self.target.startswith("ssh://"):
                raise UsageError(f"--target {self.target!r}: qemu, local or ssh://[user@]host[:port]")
            try:
                parse_ssh_url(self.target)
            except HilError as e:
                raise UsageError(f"--target: {e.message}") from None
        if self.power_cuts < 0:
            raise UsageError("--power-cuts must be 0 or more")
        if bool(self.net_down) != bool(self.net_up):
            raise UsageError("--net-down and --net-up go together")
        if self.flash_device is not None and self.flash_command:
            raise UsageError("--flash-device or --flash-command, not both")
        try:
            self.power()
        except HilError as e:
            raise UsageError(e.message) from None

    def describe_target(self) -> str:
        return self.target if self.target in ("qemu", "local") else str(parse_ssh_url(self.target))


def make_target(opts: RigOptions, name: str, workdir: Path, clock: Clock) -> Target:
    """The device the options describe. UsageError for options that do not fit together."""
    if opts.target == "qemu":
        kvm = {"auto": None, "kvm": True, "tcg": False}[opts.accel]
        cfg = QemuConfig(memory_mib=opts.memory_mib, cpus=opts.cpus, kvm=kvm, grow=opts.grow_mib << 20)
        return QemuTarget(name, workdir, config=cfg, clock=clock, limit=opts.limit)
    if opts.target == "local":
        return LocalTarget(
            name, workdir, boot_command=opts.boot_command, power=opts.power(), net_down=opts.net_down,
            net_up=opts.net_up, clock=clock, limit=opts.limit,
        )  # fmt: skip
    if opts.target.startswith("ssh://"):
        opts.check()
        cfg_ssh = SshConfig(
            address=parse_ssh_url(opts.target), console=opts.console, power=opts.power(), net_down=opts.net_down,
            net_up=opts.net_up, identity=opts.ssh_key, flash_device=opts.flash_device,
            flash_command=opts.flash_command, flash_before=opts.flash_before, flash_after=opts.flash_after,
            host_address=opts.host_address,
        )  # fmt: skip
        return SshTarget(name, workdir, cfg_ssh, clock=clock, limit=opts.limit)
    raise UsageError(f"--target {opts.target!r}: qemu, local or ssh://[user@]host[:port]")


# --- the image -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RigImage:
    disk: Path
    bundle: Path | None = None  # the first bundle (slot a's rootfs, signed)
    recipe: Path | None = None
    keys: Path | None = None  # the development PKI that signed it: sign more bundles with it
    manifest: dict[str, Any] = field(default_factory=dict)


def image_beside(disk: Path) -> RigImage:
    """What the image builder left beside `disk` (its manifest names the rest)."""
    if not disk.is_file():
        raise UsageError(f"--image {disk} is not a file")
    for path in sorted(disk.parent.glob("*.manifest.json")):
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(m, dict) or m.get("artifacts", {}).get("disk", {}).get("file") != disk.name:
            continue
        bundle_name = m["artifacts"].get("bundle", {}).get("file")
        bundle = disk.parent / bundle_name if bundle_name else None
        recipe = Path(m.get("recipe", {}).get("file", ""))
        keys_where = str(m.get("keys", ""))
        keys = Path(keys_where.removeprefix("development keys in ")) if keys_where.startswith("development") else None
        return RigImage(
            disk,
            bundle if bundle and bundle.is_file() else None,
            recipe if recipe.is_file() else None,
            keys if keys and keys.is_dir() else None,
            m,
        )
    return RigImage(disk)


def source_digest(repo: Path) -> str:
    """What the rig image is built from: the recipe folder, pyproject.toml and pitstop's packages (hil/ aside: the
    device does not run it, and scenarios change all the time)."""
    h = hashlib.sha256()
    roots = [
        repo / "pyproject.toml",
        repo / "recipes",
        *(repo / d for d in ("pitstop", "ota", "inference", "daemon", "image", "server")),
    ]
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            if "__pycache__" in f.parts or f.suffix in (".pyc", ".pyo"):
                continue
            h.update(str(f.relative_to(repo)).encode() + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def build_missing() -> str | None:
    if os.geteuid() != 0:
        return "building the rig image needs root (mmdebstrap, chroot); run as root or give --image"
    tools = [
        t
        for t in ("mmdebstrap", "chroot", "tar", "mkfs.ext4", "sfdisk", "grub-mkimage", "debugfs")
        if not shutil.which(t)
    ]
    return f"building the rig image needs {', '.join(tools)} (./dev env installs them)" if tools else None


def build_rig_image(repo: Path, *, rebuild: bool = False) -> RigImage:
    """recipes/ipc-x86_64.toml with the rig's overlay (autologin on the serial console), built with the image
    builder into .cache/hil/image and reused while what it is built from is unchanged."""
    from pitstop.image import build  # noqa: PLC0415 (heavy, and only needed when no --image is given)
    from pitstop.image.progress import Stages  # noqa: PLC0415

    cache = repo / ".cache" / "hil"
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two rigs on one checkout build once
        overlay = write_rig_overlay(cache / "overlay")
        models = rig_models()
        epoch = int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_EPOCH))
        parts = [source_digest(repo), source_digest_overlay(overlay), *(models_digest(m) for m in models), str(epoch)]
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
        out = cache / "image"
        stamp = out / "rig-key"
        recipe = repo / DEFAULT_RECIPE
        name = recipe.stem
        disk = out / f"{name}.img"
        if rebuild or not (stamp.is_file() and stamp.read_text().strip() == key and disk.is_file()):
            stamp.unlink(missing_ok=True)
            req = build.Request(
                recipe, out, repo / ".cache" / "image", repo, epoch, True, extra_overlay=overlay, extra_models=models
            )
            build.build(req, Stages(enabled=True))
            stamp.write_text(key + "\n")
        return image_beside(disk)


def models_digest(m: Model) -> str:
    h = hashlib.sha256(f"{m.name}\0{m.target}\0".encode())
    for f in (m.source, m.description_file):
        h.update(f.read_bytes() if f is not None else b"-")
    return h.hexdigest()


def source_digest_overlay(overlay: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in overlay.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(overlay)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


# --- the run ---------------------------------------------------------------------------------------------------


class Rig:
    """One pytest run of the rig: its directory, report, clock and options."""

    def __init__(self, opts: RigOptions, run_dir: Path, repo: Path, *, default_dir: bool = False) -> None:
        self.options = opts
        self.run_dir = run_dir
        self.default_dir = default_dir  # out/hil/<time>: out/hil/latest follows it
        self.repo = repo
        self.clock = Clock()
        self.seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(1 << 32)
        self.power_cuts = opts.power_cuts
        self.image: RigImage | None = None
        self._report: Report | None = None
        self._devices = 0

    @property
    def report(self) -> Report:
        """Made on first use, so that `pytest --help` or `--collect-only` leave no run directory behind."""
        if self._report is None:
            self._report = Report(
                self.run_dir,
                meta={
                    "target": self.options.describe_target(),
                    "power cuts per scenario": str(self.power_cuts),
                    "seed": str(self.seed),
                    "rig host": socket.gethostname(),
                    "pitstop": pitstop.__version__,
                },
            )
            latest = self.run_dir.parent / "latest"
            with contextlib.suppress(OSError):
                if self.default_dir and (latest.is_symlink() or not latest.exists()):
                    latest.unlink(missing_ok=True)
                    latest.symlink_to(self.run_dir.name)
        return self._report

    @property
    def has_report(self) -> bool:
        return self._report is not None

    def figure(self, name: str, value: float, unit: str = "") -> None:
        """A measurement of the test running (`reboot_to_serving_s`, 41.2, "s"): the report aggregates by name."""
        self.report.figure(name, value, unit)

    def factory_ca(self) -> tuple[Path, Path]:
        return rig_factory_ca(self.run_dir / "factory-ca")

    def provision(
        self,
        device_id: str,
        *,
        server_url: str,
        token: str = "hil-token",  # noqa: S107 (a test token for a test server)
        recipe: Path | None = None,
        metrics_url: str | None = None,
    ) -> Provision:
        """A factory identity from the rig's own factory CA; the recipe is the image's when known."""
        cert, key = self.factory_ca()
        if recipe is None and self.image is not None:
            recipe = self.image.recipe
        return Provision(device_id, server_url, token, cert, key, recipe=recipe, metrics_url=metrics_url)

    def new_target(self, name: str) -> Target:
        self._devices += 1
        workdir = self.run_dir / "work" / f"{self._devices:03d}-{name}"
        return make_target(self.options, name, workdir, self.clock)


RIG = pytest.StashKey[Rig]()
CALL_REPORT = pytest.StashKey[pytest.TestReport]()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("hil", "pitstop HIL rig (docs/hil.md)")

    def opt(name: str, dest: str, **kw: Any) -> None:
        g.addoption(name, dest=f"hil_{dest}", **kw)

    opt(
        "--target",
        "target",
        default="qemu",
        help="qemu (default), local (the rig host itself), or ssh://[user@]host[:port]",
    )
    opt(
        "--image",
        "image",
        type=Path,
        default=None,
        help="disk image to flash (default: recipes/ipc-x86_64.toml built with the rig overlay, cached in .cache/hil)",
    )
    opt(
        "--rebuild-image",
        "rebuild_image",
        action="store_true",
        default=False,
        help="rebuild the default image even if cached",
    )
    opt(
        "--power-cuts",
        "power_cuts",
        type=int,
        default=3,
        help="power cuts per repeated scenario (default 3; the bench runs hundreds)",
    )
    opt(
        "--seed",
        "seed",
        type=int,
        default=None,
        help="seed of the random points (default: random, shown in the report)",
    )
    opt("--rig-dir", "rig_dir", type=Path, default=None, help="run directory (default out/hil/<UTC time>)")
    opt(
        "--device-limit",
        "limit",
        type=float,
        default=3600.0,
        help="hard time limit per device in seconds (default 3600)",
    )
    opt(
        "--keep-disks",
        "keep_disks",
        choices=["never", "failed", "always"],
        default="failed",
        help="keep QEMU disk copies (default: of failed tests)",
    )
    opt(
        "--accel",
        "accel",
        choices=["auto", "kvm", "tcg"],
        default="auto",
        help="QEMU: KVM where the CPU has it (auto), or forced",
    )
    opt("--qemu-memory", "memory_mib", type=int, default=1024, help="QEMU: MiB (default 1024)")
    opt("--qemu-cpus", "cpus", type=int, default=1, help="QEMU: CPUs (default 1)")
    opt("--qemu-grow", "grow_mib", type=int, default=1024, help="QEMU: MiB added to each disk copy (default 1024)")
    opt(
        "--console",
        "console",
        default=None,
        help="real device's serial console: /dev/ttyUSB0[@BAUD], tcp://HOST:PORT or a command",
    )
    opt("--power-on", "power_on", default=None, help="command that switches the device on")
    opt("--power-off", "power_off", default=None, help="command that switches the device off (a cut)")
    opt("--pdu-on", "pdu_on", default=None, help="HTTP PDU: URL switching the outlet on ({outlet} filled in)")
    opt("--pdu-off", "pdu_off", default=None, help="HTTP PDU: URL switching the outlet off")
    opt("--pdu-outlet", "pdu_outlet", default="", help="HTTP PDU: the outlet, for {outlet}")
    opt("--pdu-method", "pdu_method", default="POST", help="HTTP PDU: method (default POST)")
    opt(
        "--pdu-auth", "pdu_auth", default=None, help="HTTP PDU: USER:PASSWORD for basic auth (or $PITSTOP_HIL_PDU_AUTH)"
    )
    opt("--relay", "relay", default=None, help="HID USB relay: /dev/hidrawN[:CHANNEL][:nc]")
    opt("--net-down", "net_down", default=None, help="command that cuts the device's network")
    opt("--net-up", "net_up", default=None, help="command that restores it")
    opt(
        "--flash-device",
        "flash_device",
        type=Path,
        default=None,
        help="block device the image is flashed to (an SD-mux's reader)",
    )
    opt("--flash-command", "flash_command", default=None, help="command that flashes {image} instead")
    opt("--flash-before", "flash_before", default=None, help="command before flashing (SD-mux to the rig)")
    opt("--flash-after", "flash_after", default=None, help="command after flashing (SD-mux to the device)")
    opt("--ssh-key", "ssh_key", type=Path, default=None, help="private key for SSH to the device")
    opt(
        "--host-address",
        "host_address",
        default=None,
        help="the rig's address as the device reaches it (default: found from the route)",
    )
    opt(
        "--boot-command",
        "boot_command",
        default=BOOT,
        help="--target local: the command standing in for a booting device",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Before junitxml's own configure: JUnit XML goes into the run directory unless the user chose a path."""
    if not any(line.startswith("hil") for line in config.getini("markers")):
        config.addinivalue_line("markers", MARKER)  # outside this checkout (`-p pitstop.hil.plugin`)
    opts = RigOptions.from_config(config)
    try:
        opts.check()
    except UsageError as e:
        raise pytest.UsageError(e.message) from None
    repo = Path(str(config.rootpath))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = (opts.rig_dir or repo / "out" / "hil" / stamp).absolute()
    rig = Rig(opts, run_dir, repo, default_dir=opts.rig_dir is None)
    config.stash[RIG] = rig
    quiet_run = config.option.collectonly or config.option.help or getattr(config.option, "markers", False)
    if not getattr(config.option, "xmlpath", None) and not quiet_run:
        config.option.xmlpath = str(run_dir / "junit.xml")
    config.pluginmanager.register(_Recorder(rig), "pitstop-hil-recorder")


class _Recorder:
    """Each test's outcome, duration and failure into the run's report, written after every test."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, object, object]:
        report = self.rig.report
        report.current = item.nodeid
        report.test(item.nodeid)
        try:
            return (yield)
        finally:
            report.current = None
            report.write()

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        rep = yield
        if rep.when == "call":
            item.stash[CALL_REPORT] = rep
        return rep

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        rec = self.rig.report.test(report.nodeid)
        rec.duration += report.duration
        xfail = hasattr(report, "wasxfail")
        if report.when == "setup":
            if report.failed:
                rec.outcome, rec.message, rec.details = "error", _last_line(report), report.longreprtext
            elif report.skipped:
                rec.outcome, rec.message = ("xfailed" if xfail else "skipped"), _skip_reason(report)
        elif report.when == "call":
            if report.passed:
                rec.outcome = "xpassed" if xfail else "passed"
            elif report.failed:
                rec.outcome, rec.message, rec.details = "failed", _last_line(report), report.longreprtext
            else:
                rec.outcome, rec.message = ("xfailed" if xfail else "skipped"), _skip_reason(report)
        elif report.when == "teardown" and report.failed and rec.outcome in ("passed", "running"):
            rec.outcome, rec.message = "error", "teardown: " + _last_line(report)
            rec.details = report.longreprtext

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if not self.rig.has_report:
            return
        xml = getattr(session.config.option, "xmlpath", None)
        if xml:
            self.rig.report.meta["JUnit XML"] = str(xml)
        self.rig.report.write(final=True)

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        if self.rig.has_report:
            terminalreporter.write_line(f"HIL report: {self.rig.run_dir / 'report.md'} (and report.html)")


def _rig(config: pytest.Config) -> Rig:
    return config.stash[RIG]


def _last_line(report: pytest.TestReport) -> str:
    text = report.longreprtext.strip()
    errors = [ln for ln in text.splitlines() if ln.startswith("E ")]
    if errors:  # the exception and the first line of its message; the rest is in the details
        return errors[0].removeprefix("E").strip()[:300]
    lines = text.splitlines()
    return lines[-1].strip()[:300] if lines else ""


def _skip_reason(report: pytest.TestReport) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        return str(lr[2]).removeprefix("Skipped: ")
    return str(getattr(report, "wasxfail", "") or lr or "")


# --- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def rig(request: pytest.FixtureRequest) -> Rig:
    return _rig(request.config)


@pytest.fixture(scope="session")
def rig_image(rig: Rig) -> RigImage:
    if rig.options.image is not None:
        img = image_beside(rig.options.image.absolute())
    else:
        reason = build_missing()
        if reason is not None:
            pytest.skip(reason)
        from pitstop.image.build import source_tree  # noqa: PLC0415

        repo = source_tree()
        if repo is None:
            pytest.skip("no pitstop source tree to build the rig image from; give --image")
        img = build_rig_image(repo, rebuild=rig.options.rebuild_image)
    rig.image = img
    rig.report.meta["image"] = str(img.disk)
    return img


@pytest.fixture(scope="session")
def image(rig_image: RigImage) -> Path:
    return rig_image.disk


@pytest.fixture(scope="session")
def power_cuts(rig: Rig) -> int:
    return rig.power_cuts


@pytest.fixture
def rng(rig: Rig, request: pytest.FixtureRequest) -> random.Random:
    return random.Random(f"{rig.seed}:{request.node.nodeid}")


def _needs(item: pytest.Item) -> set[str]:
    needs: set[str] = set()
    for m in item.iter_markers("hil"):
        value = m.kwargs.get("needs", ())
        needs.update([value] if isinstance(value, str) else value)
    return needs


@pytest.fixture
def target_factory(rig: Rig, request: pytest.FixtureRequest) -> Iterator[Callable[..., Target]]:
    made: list[Target] = []
    nodeid = request.node.nodeid
    if rig.options.target == "qemu" and (reason := qemu_missing()) is not None:
        pytest.skip(f"QEMU target: {reason}")
    needs = _needs(request.node)

    def factory(name: str = "dut") -> Target:
        if any(t.name == name for t in made):
            raise HilError(f"a device named {name!r} already exists in this test")
        if made and not isinstance(made[0], (QemuTarget, LocalTarget)):
            pytest.skip(f"this scenario needs {len(made) + 1} devices; the bench has one ({rig.options.target})")
        try:
            t = rig.new_target(name)
        except UsageError as e:
            raise pytest.UsageError(e.message) from None
        made.append(t)
        missing = sorted(needs - t.capabilities)
        if missing:
            pytest.skip(f"target {rig.options.describe_target()} cannot do: {', '.join(missing)} (see docs/hil.md)")
        return t

    try:
        yield factory
    finally:
        call = request.node.stash.get(CALL_REPORT, None)
        failed = call is None or call.failed
        keep = rig.options.keep_disks == "always" or (rig.options.keep_disks == "failed" and failed)
        for t in made:
            try:
                t.close()
            finally:
                rig.report.attach_device(t, test=nodeid)
                if not keep:
                    t.discard()


@pytest.fixture
def target(target_factory: Callable[..., Target]) -> Target:
    return target_factory("dut")
