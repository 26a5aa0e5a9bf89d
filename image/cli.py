"""`pitstop image …`: check recipes, assemble disk images, block maps, flash, provision (docs/image.md)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pitstop.errors import InputError, UsageError
from pitstop.image import qemu
from pitstop.progress import Progress, human_size

if TYPE_CHECKING:
    from pitstop.image.build import Request
    from pitstop.image.progress import Stages
    from pitstop.ota.signing import Signer

# The handlers import what they use: every `pitstop` command (the device's `pitstop mark-good` at boot among
# them) builds this parser, and the builder's modules would add a fifth of a second to each start here, more
# on a small device.


def register(sub: Any) -> None:
    parser = sub.add_parser("image", help="disk images from recipes: check, build, boot, flash, provision")
    isub = parser.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=type(parser))
    isub.required = True

    p = isub.add_parser("build", help="build a recipe: disk image, block map, first bundle, build manifest")
    p.add_argument("recipe", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory (created if missing)")
    p.add_argument("--cache", type=Path, help="stage cache (default: $PITSTOP_CACHE or ~/.cache/pitstop/image)")
    p.add_argument("--source", type=Path, help="pitstop source tree to install (default: the one running)")
    p.add_argument("--key", type=Path, help="PEM private key signing the first bundle (recipes with a real keyring)")
    p.add_argument("--sign-command", help="external signer instead of --key (as in `pitstop bundle create`)")
    p.add_argument("--cert", type=Path, action="append", default=[], help="signing certificate, then intermediates")
    p.add_argument("--no-bundle", action="store_true", help="do not make the first bundle")
    p.add_argument("--refresh", action="store_true", help="rebuild the Debian base even if cached (new packages)")
    p.add_argument("--extra-overlay", type=Path, help="a directory copied over the rootfs after the recipe's overlay")
    p.add_argument(
        "--l4t",
        type=Path,
        metavar="DIR",
        help="Jetson recipes: NVIDIA's BSP (Linux_for_Tegra) to put the rootfs into and flash with; without it the "
        "build stops after the rootfs and the flashing configuration",
    )
    p.add_argument(
        "--l4t-debs", type=Path, metavar="DIR", help="Jetson: .debs installed after NVIDIA's (JetPack: CUDA, TensorRT)"
    )
    p.add_argument(
        "--no-flash", action="store_true", help="Jetson: prepare the BSP's rootfs/ and the bundle, do not flash"
    )
    p.set_defaults(handler=cmd_build)

    p = isub.add_parser("boot", help="boot a disk image in QEMU (UEFI, serial console here; Ctrl-A X quits)")
    p.add_argument("image", type=Path)
    p.add_argument("--arch", default="x86_64", choices=sorted(qemu.FIRMWARE))
    p.add_argument("--memory", type=int, default=1024, help="MiB (default 1024)")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--ssh-port", type=int, help="forward this host port (127.0.0.1) to the guest's SSH")
    p.add_argument("--snapshot", action="store_true", help="leave the image unchanged (writes are discarded)")
    p.add_argument("--no-network", action="store_true")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto", help="auto: KVM where the CPU has it")
    p.add_argument("--print", action="store_true", help="print QEMU's command line instead of running it")
    p.set_defaults(handler=cmd_boot)

    p = isub.add_parser("check", help="validate a recipe (nothing is built)")
    p.add_argument("recipe", type=Path)
    p.add_argument("--json", action="store_true", help="print the recipe with every default filled in")
    p.set_defaults(handler=cmd_check)

    p = isub.add_parser("assemble", help="the disk image of a recipe around an existing rootfs image")
    p.add_argument("recipe", type=Path)
    p.add_argument("--rootfs", type=Path, required=True, help="ext4 image for slot a")
    p.add_argument("-o", "--output", type=Path, required=True, help="disk image to write (and OUTPUT.bmap)")
    p.add_argument("--workdir", type=Path, help="keep the partition images here (default: a temporary directory)")
    p.set_defaults(handler=cmd_assemble)

    p = isub.add_parser("bmap", help="write the block map of a sparse image")
    p.add_argument("image", type=Path)
    p.add_argument("-o", "--output", type=Path, help="default: IMAGE.bmap")
    p.set_defaults(handler=cmd_bmap)

    p = isub.add_parser("flash", help="write an image to a disk (or file) with its block map, then verify")
    p.add_argument("image", type=Path)
    p.add_argument("target", type=Path, help="a whole disk (/dev/sdX) nothing uses, or a regular file")
    p.add_argument("--bmap", type=Path, help="block map (default: IMAGE.bmap, else made from the image)")
    p.add_argument("--no-verify", action="store_true", help="skip reading back what was written")
    p.set_defaults(handler=cmd_flash)

    p = isub.add_parser("provision", help="write a device's identity into the data partition (no mount)")
    p.add_argument("target", type=Path, help="disk image or flashed disk")
    p.add_argument("--device-id", required=True)
    p.add_argument("--ca-cert", type=Path, required=True, help="factory CA certificate (PEM)")
    p.add_argument("--ca-key", type=Path, required=True, help="factory CA private key (PEM, unencrypted)")
    p.add_argument("--server", required=True, help="update server URL")
    p.add_argument("--token-file", type=Path, required=True, help="file holding the device's update server token")
    p.add_argument(
        "--metrics-url",
        help="OTLP/HTTP endpoint for the device's health reports, sent with its token (pitstop server: "
        "SERVER/v1/metrics)",
    )
    p.add_argument("--recipe", type=Path, help="check the target is an image of this recipe; set the host name")
    p.add_argument("--days", type=int, default=7300, help="device certificate validity (default 7300)")
    p.add_argument("--replace", action="store_true", help="replace an existing identity")
    p.set_defaults(handler=cmd_provision)


class _Bars:
    """Progress bars one after another (write, then verify), each finished when the next starts."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Progress | None = None

    def __call__(self, label: str, total: int) -> Callable[[int], None]:
        self.finish()
        self.bar = Progress(label, total, enabled=not self.quiet)
        return self.bar.update

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.finish()
            self.bar = None


def cmd_check(args: argparse.Namespace) -> int:
    from pitstop.image import recipe  # noqa: PLC0415
    from pitstop.image.sizes import format_size  # noqa: PLC0415

    r = recipe.load(args.recipe)
    if args.json:
        sys.stdout.write(recipe.dumps(r))
        return 0
    keys = "development keyring (never ship it)" if r.keys.development else f"keyring {r.keys.keyring}"
    print(f"{args.recipe}: ok: {r.name}, compatible {r.target.compatible}, version {r.bundle.version}")
    if r.target.bootloader == "nvbootctrl":
        from pitstop.image import jetson_build  # noqa: PLC0415

        cfg = jetson_build.flash_config(r)
        data = format_size(r.partitions.data or 0)
        print(f"  {cfg.board.description}: APP and APP_b {format_size(cfg.slot_size)} each, UDA {data}")
        print(f"  NVIDIA's flash: {cfg.command_line()}")
    else:
        layout = r.layout()
        sizes = ", ".join(f"{p.name} {format_size(p.size)}" for p in layout.partitions)
        print(f"  disk {format_size(layout.size)}: {sizes}")
    print(f"  {len(r.packages.include)} package(s), {len(r.user)} user(s), {len(r.model)} model(s); {keys}")
    return 0


def cmd_assemble(args: argparse.Namespace) -> int:
    from pitstop.image import bmap as bmaps  # noqa: PLC0415
    from pitstop.image import disk, partitions, recipe  # noqa: PLC0415
    from pitstop.image.sizes import format_size  # noqa: PLC0415

    r = recipe.load(args.recipe)
    if not args.rootfs.is_file():
        raise InputError(f"rootfs image {args.rootfs} is not a file")
    if not args.output.parent.is_dir():
        raise InputError(f"output directory {args.output.parent} does not exist")
    bars = _Bars(args.quiet)
    with tempfile.TemporaryDirectory(prefix="pitstop-image-") as tmp:
        try:
            built = disk.build_disk(r, args.rootfs, args.output, args.workdir or Path(tmp), progress=bars)
            bm = bmaps.create(args.output, progress=bars)
        finally:
            bars.finish()
        bmaps.write(bmaps.default_path(args.output), bm)
    print(
        f"assembled {args.output}: {format_size(built.layout.size)}, {human_size(bm.mapped_bytes)} mapped "
        f"({bmaps.default_path(args.output).name}); PARTUUID of rootfs_a "
        f"{built.layout.part(partitions.SLOT_PARTITIONS['a']).uuid}"
    )
    return 0


def cmd_bmap(args: argparse.Namespace) -> int:
    from pitstop.image import bmap as bmaps  # noqa: PLC0415

    if not args.image.is_file():
        raise InputError(f"{args.image} is not a file")
    bars = _Bars(args.quiet)
    bm = bmaps.create(args.image, progress=bars)
    bars.finish()
    out = args.output or bmaps.default_path(args.image)
    bmaps.write(out, bm)
    print(
        f"wrote {out}: {human_size(bm.mapped_bytes)} of {human_size(bm.image_size)} mapped in {len(bm.ranges)} range(s)"
    )
    return 0


def cmd_flash(args: argparse.Namespace) -> int:
    from pitstop.image import flash  # noqa: PLC0415

    if not args.image.is_file():
        raise InputError(f"image {args.image} is not a file")
    bars = _Bars(args.quiet)
    try:
        res = flash.flash(args.image, args.target, bmap_path=args.bmap, verify=not args.no_verify, progress=bars)
    finally:
        bars.finish()
    checked = "verified" if res.verified else "NOT verified"
    gpt = "; backup GPT moved to the end of the target" if res.gpt_relocated else ""
    print(f"flashed {args.image} to {args.target}: {human_size(res.written)} written, {checked}{gpt}")
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    from pitstop.image import provision  # noqa: PLC0415

    ca = provision.load_factory_ca(args.ca_cert, args.ca_key)
    try:
        token = args.token_file.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the token file {args.token_file}: {e}") from None
    if args.days < 1:
        raise UsageError("--days must be at least 1")
    files, hostname = provision.provision_device(
        args.target,
        args.device_id,
        ca,
        server_url=args.server,
        token=token,
        recipe_path=args.recipe,
        days=args.days,
        metrics_url=args.metrics_url,
        replace=args.replace,
    )
    named = f" (host name {hostname})" if hostname else ""
    print(f"provisioned {args.target} as {args.device_id}{named}: {', '.join(files)}")
    return 0


def _signer(args: argparse.Namespace) -> Signer | None:
    from pitstop.ota.signing import signer_from_options  # noqa: PLC0415

    return signer_from_options(args.key, args.sign_command, args.cert)


def cmd_build(args: argparse.Namespace) -> int:
    from pitstop.image import build, disk, recipe  # noqa: PLC0415
    from pitstop.image.progress import Stages  # noqa: PLC0415

    r = recipe.load(args.recipe)  # a bad recipe fails here, before anything else is looked at
    jetson_recipe = r.target.bootloader == "nvbootctrl"
    if not jetson_recipe and (args.l4t or args.l4t_debs or args.no_flash):
        raise UsageError("--l4t, --l4t-debs and --no-flash are for Jetson recipes (bootloader nvbootctrl)")
    if args.l4t_debs is not None and (args.l4t is None or not args.l4t_debs.is_dir()):
        raise UsageError("--l4t-debs DIR needs --l4t and a directory of .deb files")
    if args.no_flash and args.l4t is None:
        raise UsageError("--no-flash needs --l4t (without a BSP nothing is flashed)")
    source = args.source or build.source_tree()
    if source is None or not (source / "pyproject.toml").is_file():
        raise UsageError("no pitstop source tree to install into the image: give --source DIR (a checkout)")
    sde = os.environ.get("SOURCE_DATE_EPOCH")
    epoch = disk.epoch_now()
    req = build.Request(
        recipe=args.recipe,
        output=args.output,
        cache=args.cache or build.default_cache(),
        source=source,
        epoch=epoch,
        pinned=sde is not None,
        signer=_signer(args),
        refresh=args.refresh,
        extra_overlay=args.extra_overlay,
        bundle=not args.no_bundle,
    )
    stages = Stages(enabled=not args.quiet)
    if jetson_recipe:
        return _build_jetson(req, args, stages)
    res = build.build(req, stages)
    o = res.outputs
    rows = (("disk", o.disk), ("bmap", o.bmap), ("bundle", o.bundle), ("rootfs", o.rootfs), ("manifest", o.manifest))
    _print_built(res.manifest, res.seconds, res.reused, req.cache, rows)
    return 0


def _print_built(
    manifest: dict[str, Any],
    seconds: dict[str, float],
    reused: dict[str, bool],
    cache: Path,
    rows: tuple[tuple[str, Path | None], ...],
) -> None:
    from pitstop.image.progress import format_duration  # noqa: PLC0415

    cached = [k for k, v in reused.items() if v]
    print(
        f"built {manifest['recipe']['name']} in {format_duration(sum(seconds.values()))}"
        + (f" ({', '.join(cached)} reused from {cache})" if cached else "")
    )
    for label, path in rows:
        if path is not None:
            print(f"  {label:9} {path}")


def _build_jetson(req: Request, args: argparse.Namespace, stages: Stages) -> int:
    from pitstop.image import jetson_build  # noqa: PLC0415

    l4t = jetson_build.L4t(bsp=args.l4t, debs=jetson_build.debs_in(args.l4t_debs), flash=not args.no_flash)
    res = jetson_build.build_jetson(req, l4t, stages)
    o = res.outputs
    rows = (
        ("rootfs", o.rootfs_tar),
        ("flash", o.flash_dir),
        ("ext4", o.rootfs if res.integrated else None),
        ("bundle", o.bundle if res.integrated else None),
        ("manifest", o.manifest),
    )
    _print_built(res.manifest, res.seconds, res.reused, req.cache, rows)
    for line in jetson_build.summary(res):
        print(line)
    return 0


def cmd_boot(args: argparse.Namespace) -> int:
    from pitstop.runner import run  # noqa: PLC0415

    if not args.image.is_file() and not args.image.is_block_device():
        raise InputError(f"image {args.image} is not a file")
    if args.memory < 256 or args.cpus < 1:
        raise UsageError("--memory must be at least 256 (MiB) and --cpus at least 1")
    kvm = None if args.accel == "auto" else args.accel == "kvm"
    if kvm and not qemu.kvm_usable(args.arch):
        raise UsageError("KVM is not usable here (no vmx/svm on this CPU, or /dev/kvm not accessible): --accel tcg")
    opts = qemu.BootOptions(
        arch=args.arch,
        memory_mib=args.memory,
        cpus=args.cpus,
        kvm=kvm,
        network=not args.no_network,
        ssh_port=args.ssh_port,
        snapshot=args.snapshot,
    )
    with tempfile.TemporaryDirectory(prefix="pitstop-boot-") as tmp:
        nvram = qemu.vars_copy(args.arch, Path(tmp) / "VARS.fd")
        argv = qemu.argv(args.image, nvram, opts)
        if args.print:
            print(shlex.join(argv))
            return 0
        res = run(argv, interactive=True, check=False)
    return res.returncode
