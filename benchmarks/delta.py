"""Delta install over HTTP between two real rootfs images: bytes downloaded / bytes that differ.

Issue target (issue 9): with two rootfs images from the image builder, the second with one package
upgraded and one configuration file changed, the bytes a delta install downloads are at most 1.5x the
bytes that differ between the two images at 4 KiB block granularity (every 4 KiB block that is not
identical at the same offset counts whole; the baseline, computed in the same run). RAUC's adaptive
updates, the anchor, downloaded about 10% of a bundle for a small ext4 change: the share of the bundle is
printed too.

How:
- two `pitstop image build` runs of recipes/ipc-x86_64.toml (copied to a work directory): OLD with one
  package pinned to an older version (`--pin`, default ca-certificates at bookworm's 20230311+deb12u1,
  NEW gets bookworm-security's), and a different /etc/chrony/conf.d/site.conf in each (`--extra-overlay`);
  the same SOURCE_DATE_EPOCH for both (a release pipeline's reproducible builds: everything else equal);
  their own stage cache. `--builds DIR` keeps the two builds there and reuses them on the next run;
- the measured figure: a real delta install of NEW's bundle, served by a loopback HTTP server that counts
  every body byte it sends, onto a file-backed device whose slot a holds OLD's rootfs image as flashed at
  the factory (no chunk index recorded: the installer chunks the slot); the written slot b must be
  byte-identical to NEW's rootfs image; the whole install is timed, and a full (--no-delta) install too;
- `pitstop bundle diff OLD NEW` (the device that installed OLD and recorded its index) is printed beside it;
- `--sweep MIN:AVG:MAX …` re-creates both bundles with other chunking parameters and prints what
  `bundle diff` predicts for each (the figures in docs/delta.md come from this).

Usage:  sudo .venv/bin/python benchmarks/delta.py [--builds DIR] [--pin PKG=VERSION] [--json]
        [--sweep 4096:16384:65536 8192:32768:131072 ...] [--workdir DIR] [--keep]

Exits 0 whatever the verdict (benchmarks report, tests judge); non-zero only when it could not measure.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from _common import CommandFailed, bench_main, human, machine, pitstop_command, require_tools, run_timed
from install import BenchDevice, digest, serve

from pitstop.ota.bundle_diff import diff_bundles
from pitstop.ota.bundle_reader import read_preamble
from pitstop.ota.bundle_spec import BundleSpec, PayloadSpec
from pitstop.ota.bundle_writer import create_bundle
from pitstop.ota.installer import Installer
from pitstop.ota.system_config import load

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "ipc-x86_64.toml"
RECIPE_COMPATIBLE = "pitstop-ipc-x86_64"  # the recipe's target.compatible
TARGET = 1.5
BLOCK = 4096
EPOCH = "1763856000"  # 2025-11-23: any fixed value; the same for both builds
DEFAULT_PIN = "ca-certificates=20230311+deb12u1"
_READ = 4 << 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--builds", type=Path, help="keep the two image builds here and reuse them when present")
    p.add_argument("--pin", default=DEFAULT_PIN, help=f"PKG=VERSION in OLD, the newest in NEW (default {DEFAULT_PIN})")
    p.add_argument("--sweep", nargs="*", default=[], metavar="MIN:AVG:MAX", help="other chunking parameters to compare")
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/var/tmp")))
    return p.parse_args(argv)


# --- the two builds ------------------------------------------------------------------------------------------


def _recipe(work: Path, name: str, pin: str | None, version: str) -> Path:
    """recipes/ipc-x86_64.toml and its files, copied; `pin` replaces its package of that name."""
    d = work / f"recipe-{name}"
    d.mkdir(parents=True)
    shutil.copytree(RECIPE.with_suffix(""), d / RECIPE.with_suffix("").name, symlinks=True)
    text = RECIPE.read_text()
    if pin:
        pkg = pin.split("=", 1)[0]
        if f'"{pkg}"' not in text:
            raise CommandFailed(["--pin"], 2, f"{pkg} is not in {RECIPE}'s packages")
        text = text.replace(f'"{pkg}"', f'"{pin}"', 1)
    text = text.replace('version = "1.0.0"', f'version = "{version}"', 1)
    out = d / RECIPE.name
    out.write_text(text)
    return out


def _overlay(work: Path, name: str, server: str) -> Path:
    d = work / f"overlay-{name}"
    conf = d / "etc/chrony/conf.d/site.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text(f"# the site's time servers\nserver {server} iburst\n")
    return d


def build(builds: Path, work: Path, name: str, pin: str | None, version: str, ntp: str) -> tuple[Path, Path, float]:
    """(rootfs image, bundle, seconds; 0 when reused) of one build."""
    out = builds / name
    rootfs, bundle = out / "ipc-x86_64.rootfs.ext4", out / f"ipc-x86_64-{version}.pitb"
    if rootfs.is_file() and bundle.is_file():
        return rootfs, bundle, 0.0
    log(f"building {name} (pitstop image build; a few minutes)")
    argv = [
        *pitstop_command(None),
        "-q",
        "image",
        "build",
        str(_recipe(work, name, pin, version)),
        "-o",
        str(out),
        "--cache",
        str(builds / "cache"),
        "--extra-overlay",
        str(_overlay(work, name, ntp)),
    ]
    os.environ["SOURCE_DATE_EPOCH"] = EPOCH
    wall = run_timed(argv).wall
    return rootfs, bundle, wall


# --- the baseline: 4 KiB blocks that differ ----------------------------------------------------------------------


def differing_blocks(a: Path, b: Path) -> tuple[int, int]:
    """(4 KiB blocks of `b` that differ from `a` at the same offset, blocks of `b`); past `a`'s end all differ."""
    differ = total = 0
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while True:
            xb = fb.read(_READ)
            if not xb:
                break
            xa = fa.read(len(xb))
            for off in range(0, len(xb), BLOCK):
                total += 1
                if xa[off : off + BLOCK] != xb[off : off + BLOCK]:
                    differ += 1
    return differ, total


# --- the install -------------------------------------------------------------------------------------------------


def _device(work: Path, name: str, keyring: Path, old_rootfs: Path, slot_size: int) -> BenchDevice:
    dev = BenchDevice(work / name, slot_size, RECIPE_COMPATIBLE)
    dev.root.mkdir(parents=True)
    dev.reset(keyring)
    shutil.copyfile(old_rootfs, dev.slot_a)  # as flashed: no chunk index recorded
    os.truncate(dev.slot_a, slot_size)
    return dev


def install(dev: BenchDevice, url: str, *, delta: bool) -> tuple[float, int]:
    cfg = load(dev.config)
    t0 = time.perf_counter()
    res = Installer(cfg, delta=delta).install(url)
    return time.perf_counter() - t0, res.bytes_seeded


def _keyring(builds: Path) -> Path:
    """The builds' development keyring (the image builder keeps its dev PKI in the stage cache)."""
    path = builds / "cache" / "dev-keys" / "keyring.pem"
    if not path.is_file():
        raise CommandFailed(["keyring"], 1, f"no {path}")
    return path


def sweep(old_rootfs: Path, new_rootfs: Path, work: Path, chunkings: list[str]) -> list[dict[str, Any]]:
    """What `bundle diff` predicts with other chunking parameters (unsigned bundles: nothing is installed)."""
    rows = []
    for text in chunkings:
        cmin, cavg, cmax = (int(x) for x in text.split(":"))
        paths = []
        for name, src in (("old", old_rootfs), ("new", new_rootfs)):
            spec = BundleSpec(
                "1.0.0", 1, "bench", (PayloadSpec("rootfs", "rootfs", src, "rootfs"),), chunking=(cmin, cavg, cmax)
            )
            out = work / f"sweep-{name}-{cavg}.pitb"
            log(f"sweep {text}: bundle of {name}")
            create_bundle(spec, out, None)
            paths.append(out)
        d = diff_bundles(paths[0], paths[1])
        p = d.payloads[0]
        rows.append(
            {
                "chunking": text,
                "bundle": d.new_size,
                "download": d.download,
                "requests": d.requests,
                "chunks": p.chunks,
                "reused_chunks": p.reused_chunks,
                "index_and_table": _index_and_table(paths[1]),
            }
        )
        for path in paths:
            path.unlink()
    return rows


def _index_and_table(bundle: Path) -> int:
    """Bytes of the rootfs payload's chunk index and size table: downloaded by every delta install."""
    with open(bundle, "rb") as f:
        p = read_preamble(f).manifest.payloads[0]
    return p.data.offset - p.region_start


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    require_tools("mmdebstrap", "mkfs.ext4")
    builds = args.builds or work / "builds"
    builds.mkdir(parents=True, exist_ok=True)
    old_rootfs, old_bundle, t_old = build(builds, work, "old", args.pin, "1.0.0", "ntp1.site.example")
    new_rootfs, new_bundle, t_new = build(builds, work, "new", None, "1.0.1", "ntp2.site.example")

    log("comparing the two images block by block")
    differ, blocks = differing_blocks(old_rootfs, new_rootfs)
    differ_bytes = differ * BLOCK

    log("bundle diff")
    t0 = time.perf_counter()
    predicted = diff_bundles(old_bundle, new_bundle)
    t_diff = time.perf_counter() - t0

    keyring = _keyring(builds)
    slot_size = max(old_rootfs.stat().st_size, new_rootfs.stat().st_size) + (1 << 20)
    new_sha = digest(new_rootfs)
    results: dict[str, dict[str, Any]] = {}
    with serve(new_bundle) as (url, srv):
        for mode, delta in (("delta", True), ("full", False)):
            log(f"{mode} install over loopback HTTP")
            dev = _device(work, mode, keyring, old_rootfs, slot_size)
            before = srv.sent
            wall, seeded = install(dev, url, delta=delta)
            if digest(dev.slot_b, new_rootfs.stat().st_size) != new_sha:
                raise CommandFailed(["install", mode], 1, "slot b is not byte-identical to NEW's rootfs image")
            results[mode] = {"served": srv.sent - before, "seconds": round(wall, 2), "seeded": seeded}
            shutil.rmtree(dev.root)
    served = results["delta"]["served"]
    bundle_size = new_bundle.stat().st_size
    p = predicted.payloads[0]
    return {
        "machine": machine(),
        "pin": args.pin,
        "images": {
            "old": str(old_rootfs),
            "new": str(new_rootfs),
            "old_size": old_rootfs.stat().st_size,
            "new_size": new_rootfs.stat().st_size,
            "build_s": [round(t_old, 1), round(t_new, 1)],
        },
        "baseline": {"differing_blocks": differ, "blocks": blocks, "bytes": differ_bytes},
        "bundle": bundle_size,
        "chunking": list(_chunking(new_bundle)),
        "delta": results["delta"],
        "full": results["full"],
        "bundle_diff": {
            "download": predicted.download,
            "requests": predicted.requests,
            "seed": p.seed,
            "reused_chunks": p.reused_chunks,
            "chunks": p.chunks,
            "seconds": round(t_diff, 2),
        },
        "ratio": round(served / differ_bytes, 3) if differ_bytes else None,
        "share_of_bundle": round(served / bundle_size, 4),
        "target": TARGET,
        "sweep": sweep(old_rootfs, new_rootfs, work, args.sweep) if args.sweep else [],
    }


def _chunking(bundle: Path) -> tuple[int, int, int]:
    with open(bundle, "rb") as f:
        return read_preamble(f).manifest.payloads[0].chunking


def table(r: dict[str, Any]) -> str:
    b, d, full, bd = r["baseline"], r["delta"], r["full"], r["bundle_diff"]
    ratio = r["ratio"]
    verdict = "n/a" if ratio is None else ("meets" if ratio <= r["target"] else "misses")
    lines = [
        f"delta install: {r['images']['old']} -> {r['images']['new']} ({r['pin']} upgraded, one config file changed)",
        f"  images: {human(r['images']['old_size'])} and {human(r['images']['new_size'])}; "
        f"chunking {':'.join(str(x) for x in r['chunking'])}",
        f"  baseline: {b['differing_blocks']} of {b['blocks']} 4 KiB blocks differ = {human(b['bytes'])}",
        f"  delta over HTTP: {human(d['served'])} served ({d['served']} bytes), {human(d['seeded'])} from slot a, "
        f"{d['seconds']} s",
        f"  full over HTTP:  {human(full['served'])} served, {full['seconds']} s",
        f"  bundle diff (recorded index): {human(bd['download'])} in {bd['requests']} requests, "
        f"{bd['reused_chunks']} of {bd['chunks']} chunks reused",
        f"  downloaded / differing 4 KiB blocks: {ratio}x (target <= {r['target']}x: {verdict}); "
        f"{r['share_of_bundle']:.1%} of the {human(r['bundle'])} bundle (RAUC's anchor: ~10%)",
    ]
    if r["sweep"]:
        lines.append("  chunking sweep (bundle diff, same images):")
        lines.append(
            f"    {'min:avg:max':<24}{'bundle':>12}{'download':>12}{'ratio':>8}{'index+table':>13}{'chunks':>9}"
        )
        for s in r["sweep"]:
            lines.append(
                f"    {s['chunking']:<24}{human(s['bundle']):>12}{human(s['download']):>12}"
                f"{s['download'] / b['bytes']:>7.2f}x{human(s['index_and_table']):>13}{s['chunks']:>9}"
            )
    return "\n".join(lines)


def log(msg: str) -> None:
    sys.stderr.write(f"delta: {msg}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return bench_main("delta", args, run, table)


if __name__ == "__main__":
    sys.exit(main())
