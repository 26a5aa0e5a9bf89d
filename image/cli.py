"""`pitstop image …`: check recipes, assemble disk images, block maps, flash, provision (docs/image.md)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pitstop.errors import InputError, UsageError
from pitstop.image import bmap as bmaps
from pitstop.image import disk, flash, partitions, provision, recipe
from pitstop.image.sizes import format_size
from pitstop.progress import Progress, human_size


def register(sub: Any) -> None:
    parser = sub.add_parser("image", help="disk images from recipes: check, assemble, bmap, flash, provision")
    isub = parser.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=type(parser))
    isub.required = True

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
    r = recipe.load(args.recipe)
    if args.json:
        sys.stdout.write(recipe.dumps(r))
        return 0
    layout = r.layout()
    sizes = ", ".join(f"{p.name} {format_size(p.size)}" for p in layout.partitions)
    keys = "development keyring (never ship it)" if r.keys.development else f"keyring {r.keys.keyring}"
    print(f"{args.recipe}: ok: {r.name}, compatible {r.target.compatible}, version {r.bundle.version}")
    print(f"  disk {format_size(layout.size)}: {sizes}")
    print(f"  {len(r.packages.include)} package(s), {len(r.user)} user(s), {len(r.model)} model(s); {keys}")
    return 0


def cmd_assemble(args: argparse.Namespace) -> int:
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
    ca = provision.load_factory_ca(args.ca_cert, args.ca_key)
    try:
        token = args.token_file.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the token file {args.token_file}: {e}") from None
    if args.days < 1:
        raise UsageError("--days must be at least 1")
    hostname = expect = None
    if args.recipe is not None:
        r = recipe.load(args.recipe)
        hostname = recipe.render_hostname(r.system.hostname, args.device_id)
        expect = partitions.identity_uuid(r.identity, "fs:data")
    files = provision.identity_files(
        args.device_id, ca, server_url=args.server, token=token, hostname=hostname, days=args.days
    )
    provision.provision(args.target, files, replace=args.replace, expect_fs_uuid=expect)
    named = f" (host name {hostname})" if hostname else ""
    print(f"provisioned {args.target} as {args.device_id}{named}: {', '.join(sorted(files))}")
    return 0
