"""`pitstop image build`: a recipe becomes the disk image, its block map, the first signed bundle of its rootfs
and a manifest of the build (docs/image.md "Building an image").

    keys → wheels → base (mmdebstrap, cached) → system (configured tree, cached) → rootfs (overlay, ext4)
         → bundle (signed, verified against the image's keyring) → disk (ESP, slots, data) → bmap → manifest

Every output is written beside its final name and renamed into place, so OUT never holds a half-written file
under a final name. The manifest is written last: its presence says the build completed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pitstop
from pitstop.atomic import atomic_write
from pitstop.errors import UsageError
from pitstop.image import bmap as bmaps
from pitstop.image import disk, recipe, rootfs, sparse
from pitstop.image.datafs import file_sha256
from pitstop.image.errors import ImageBuildError
from pitstop.image.progress import Stages, Step
from pitstop.image.recipe import Model, Recipe
from pitstop.ota import bundle_format as fmt
from pitstop.ota import devkeys
from pitstop.ota.bundle_reader import Policy, open_verified, verify_payloads
from pitstop.ota.bundle_spec import BundleSpec, PayloadSpec
from pitstop.ota.bundle_writer import create_bundle
from pitstop.ota.clock import Clock, ClockPolicy
from pitstop.ota.installer import bundle_info
from pitstop.ota.keyring import load_keyring
from pitstop.ota.signing import KeyFileSigner, Signer
from pitstop.runner import run

MANIFEST_FORMAT = 1
DEV_KEYS_DIR = "dev-keys"
# The builder's development PKI is valid from here, so that bundles signed at any SOURCE_DATE_EPOCH of a
# reproducible build fall inside its certificates' validity.
DEV_NOT_BEFORE = datetime(2000, 1, 1, tzinfo=UTC)


def default_cache() -> Path:
    """$PITSTOP_CACHE, else $XDG_CACHE_HOME/pitstop/image, else ~/.cache/pitstop/image."""
    if env := os.environ.get("PITSTOP_CACHE"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pitstop" / "image"


def source_tree() -> Path | None:
    """The pitstop source tree this code runs from (a checkout or an editable install), if there is one."""
    root = Path(pitstop.__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "image").is_dir() else None


@dataclass(frozen=True)
class Request:
    recipe: Path
    output: Path
    cache: Path
    source: Path  # pitstop's source tree: its wheel goes into the image
    epoch: int
    pinned: bool  # epoch came from SOURCE_DATE_EPOCH: a reproducible build, keyed by it
    signer: Signer | None = None  # None: the recipe's development keys
    refresh: bool = False  # rebuild the base even if cached
    extra_overlay: Path | None = None  # applied after the recipe's overlay
    extra_models: tuple[Model, ...] = ()  # preloaded after the recipe's own (the HIL rig's)
    bundle: bool = True


@dataclass(frozen=True)
class Outputs:
    disk: Path
    bmap: Path
    bundle: Path | None
    rootfs: Path
    manifest: Path

    @staticmethod
    def of(r: Recipe, out: Path) -> Outputs:
        return Outputs(
            disk=out / f"{r.name}.img",
            bmap=out / f"{r.name}.img.bmap",
            bundle=out / f"{r.name}-{r.bundle.version}.pitb",
            rootfs=out / f"{r.name}.rootfs.ext4",
            manifest=out / f"{r.name}.manifest.json",
        )


@dataclass
class Result:
    outputs: Outputs
    manifest: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)


# --- keys --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    keyring: Path  # a PEM file or directory, as load_keyring takes it
    keyring_pem: bytes
    signer: Signer | None
    where: str  # for the manifest and messages


def dev_keys(cache: Path) -> Path:
    """The builder's development PKI (`pitstop keys create-dev` layout), made once beside the cache."""
    d = cache / DEV_KEYS_DIR
    if (d / "keyring.pem").is_file():
        return d
    tmp = Path(tempfile.mkdtemp(prefix=".dev-keys-", dir=cache))
    try:
        devkeys.write_dev_pki(devkeys.make_dev_pki(name="pitstop image dev", not_before=DEV_NOT_BEFORE), tmp / "k")
        try:
            os.rename(tmp / "k", d)
        except OSError:
            if not (d / "keyring.pem").is_file():  # not another build that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def resolve_keys(r: Recipe, req: Request) -> Keys:
    if r.keys.development:
        if req.signer is not None:
            raise UsageError('the recipe uses keyring = "dev": the bundle is signed with the builder\'s dev keys')
        req.cache.mkdir(parents=True, exist_ok=True)
        d = dev_keys(req.cache.resolve())
        signer = KeyFileSigner.load(d / "signing.key", [d / "chain.pem"])
        return Keys(d / "keyring.pem", (d / "keyring.pem").read_bytes(), signer, f"development keys in {d}")
    assert isinstance(r.keys.keyring, Path)
    path = r.keys.keyring
    pem = b"".join(p.read_bytes() for p in sorted(path.glob("*.pem"))) if path.is_dir() else path.read_bytes()
    if req.signer is None and req.bundle:
        raise UsageError(
            f"the recipe's keyring is {path}: sign the first bundle with --key/--cert or --sign-command "
            "(or build without it: --no-bundle)"
        )
    return Keys(path, pem, req.signer, str(path))


# --- the build ---------------------------------------------------------------------------------------------


def first_bundle(
    r: Recipe, rootfs_image: Path, out: Path, keys: Keys, epoch: int, stages: Stages, *, source: Path
) -> dict[str, Any]:
    """The first bundle at `out` (to be moved to `source`): slot a's rootfs as a signed bundle, checked the way a
    device of this image would check it (its keyring, its compatible string, every chunk). Returns what the data
    partition records for slot a, as an install of that bundle would have recorded it."""
    spec = BundleSpec(
        version=r.bundle.version,
        security_version=r.bundle.security_version,
        compatible=r.target.compatible,
        payloads=(PayloadSpec("rootfs", "rootfs", rootfs_image, "rootfs"),),
        description=f"{r.name} {r.bundle.version}: {r.description}".strip(),
        chunking=fmt.FS_IMAGE_CHUNKING,
        created=datetime.fromtimestamp(epoch, UTC),
    )
    size = rootfs_image.stat().st_size
    with stages.bar("bundle: chunk, compress, sign", size) as update:
        create_bundle(spec, out, keys.signer, progress=update)
    keyring = load_keyring(keys.keyring)
    clock = Clock(ClockPolicy(r.keys.clock), datetime.now(UTC), datetime.fromtimestamp(epoch, UTC))
    with out.open("rb") as f, stages.bar("bundle: verify as the device will", size) as update:
        vp = open_verified(f, Policy(keyring, clock, r.target.compatible, r.bundle.security_version))
        verify_payloads(f, vp.manifest, update)
    return bundle_info(vp, str(source))


def prepare(req: Request, bootloader: str) -> tuple[Recipe, Keys]:
    """The recipe (validated, with the request's extra models) and the keys, before anything is built. A recipe for
    another `bootloader` than the caller builds is refused: GRUB images and Jetsons are built differently."""
    r = recipe.load(req.recipe)
    if r.target.bootloader != bootloader:
        builder = "pitstop.image.jetson_build" if r.target.bootloader == "nvbootctrl" else "pitstop.image.build"
        raise UsageError(f"{req.recipe}: bootloader {r.target.bootloader!r}: {builder} builds it")
    if req.extra_overlay is not None and not req.extra_overlay.is_dir():
        raise UsageError(f"--extra-overlay {req.extra_overlay} is not a directory")
    if req.extra_models:
        r = with_models(r, req.extra_models)
    if os.geteuid() != 0:
        raise ImageBuildError("building an image needs root (mmdebstrap --mode=root, chroot)")
    keys = resolve_keys(r, req)
    req.output.mkdir(parents=True, exist_ok=True)
    return r, keys


def build(req: Request, stages: Stages) -> Result:
    r, keys = prepare(req, "grub")
    outs = Outputs.of(r, req.output)
    if not req.bundle:
        outs = Outputs(outs.disk, outs.bmap, None, outs.rootfs, outs.manifest)
    outs.manifest.unlink(missing_ok=True)  # a manifest only ever describes a finished build
    cache = rootfs.Cache(req.cache.resolve())
    result = Result(outs, {})
    with tempfile.TemporaryDirectory(prefix=".pitstop-build-", dir=req.output) as tmpdir:
        work = Path(tmpdir)
        with stages.step("wheels", "pitstop's wheel and its dependencies'"):
            wheels = rootfs.wheelhouse(req.source, work / "wheels", cache, arch=r.target.arch)
        python = python_packages(wheels)
        rootfs_tmp = work / "rootfs.ext4"
        with stages.step("rootfs", "base (mmdebstrap), system (accounts, pitstop), overlay, ext4") as st:
            built = rootfs.build_rootfs(r, rootfs_tmp, tree_inputs(req, cache, keys, wheels, st))
        result.reused.update(base=built.base_reused, system=built.system_reused)
        rootfs_sha = file_sha256(rootfs_tmp)
        slot_a: dict[str, Any] | None = None
        if outs.bundle is not None:
            with stages.step("bundle", f"{outs.bundle.name}, signed with {keys.where}"):
                slot_a = first_bundle(
                    r, rootfs_tmp, work / outs.bundle.name, keys, req.epoch, stages, source=outs.bundle
                )
                os.replace(work / outs.bundle.name, outs.bundle)
        grub_modules = built.grub_modules(r.target.arch)  # arm64: from the image's tree (image/esp.py)
        with stages.step("disk", f"{outs.disk.name}: ESP, slot a, data"):
            disk_tmp = work / outs.disk.name
            parts = disk.build_disk(
                r,
                rootfs_tmp,
                disk_tmp,
                work / "disk",
                epoch=req.epoch,
                slot_a_bundle=slot_a,
                progress=stages.bars,
                grub_modules=grub_modules,
            )
            bm = bmaps.create(disk_tmp, progress=stages.bars)
            stages.end_bars()
            os.replace(disk_tmp, outs.disk)
            bmaps.write(outs.bmap, bm)
        os.replace(rootfs_tmp, outs.rootfs)
    result.seconds = stages.seconds
    artifacts = disk_artifacts(outs, parts.layout.size, bm, rootfs_sha, slot_a)
    result.manifest = build_manifest(r, req, built, python, keys, result.seconds, artifacts)
    atomic_write(outs.manifest, (json.dumps(result.manifest, indent=2, sort_keys=True) + "\n").encode())
    return result


def tree_inputs(req: Request, cache: rootfs.Cache, keys: Keys, wheels: Path, st: Step) -> rootfs.TreeInputs:
    """The rootfs stages' inputs for `req`, noting on `st` whether each stage was built or reused."""
    return rootfs.TreeInputs(
        cache,
        keys.keyring_pem,
        wheels,
        req.epoch,
        pinned=req.pinned,
        refresh=req.refresh,
        extra_overlay=req.extra_overlay,
        on_stage=lambda name, reused: st.note(f"{name} {'reused from the cache' if reused else 'built'}"),
    )


def with_models(r: Recipe, extra: tuple[Model, ...]) -> Recipe:
    """`r` preloading `extra` too; a target that another model's overlaps is refused, as in a recipe."""
    for m in extra:
        clash = recipe.overlapping_target(m.target, [o.target for o in r.model])
        if clash is not None:
            raise UsageError(f"extra model {m.name}: its target {m.target!r} overlaps the target {clash!r}")
        r = dataclasses.replace(r, model=(*r.model, m))
    return r


def python_packages(wheels: Path) -> list[dict[str, str]]:
    """Name, version and SHA-256 of every wheel installed into the image's virtual environment."""
    out = []
    for w in sorted(wheels.glob("*.whl")):
        name, version = w.name.split("-")[:2]
        out.append({"name": name, "version": version, "wheel": w.name, "sha256": file_sha256(w)})
    return out


def tool_versions() -> dict[str, str]:
    """Versions of the tools whose output is in the image (the reproducibility caveats in docs/image.md)."""
    probes = {
        "mmdebstrap": (["mmdebstrap", "--version"], r"mmdebstrap (\S+)"),
        "e2fsprogs": (["mke2fs", "-V"], r"mke2fs (\S+)"),
        "dosfstools": (["mkfs.vfat", "--help"], r"mkfs\.fat (\S+)"),
        "mtools": (["mtools", "--version"], r"mtools\S*\s+(?:\(GNU mtools\)\s+)?(\d\S*)"),
        "grub": (["grub-mkimage", "--version"], r"\(GRUB\) (\S+)"),
        "sfdisk": (["sfdisk", "--version"], r"util-linux (\S+)"),
    }
    out = {}
    for name, (argv, rx) in probes.items():
        res = run(argv, check=False)
        m = re.search(rx, (res.stdout + res.stderr).decode("utf-8", "replace"))
        out[name] = m[1] if m else "unknown"
    return out


def file_entry(p: Path, sha: str | None = None) -> dict[str, Any]:
    return {"file": p.name, "size": p.stat().st_size, "sha256": sha or file_sha256(p)}


def disk_artifacts(
    outs: Outputs, disk_size: int, bm: bmaps.Bmap, rootfs_sha: str, slot_a: dict[str, Any] | None
) -> dict[str, Any]:
    artifacts: dict[str, Any] = {
        "disk": {
            "file": outs.disk.name,
            "size": disk_size,
            "allocated": sparse.allocated(outs.disk),
            "mapped": bm.mapped_bytes,
            # The disk is identified by its block map: a SHA-256 per mapped range, zeros elsewhere.
            "bmap": file_entry(outs.bmap),
        },
        "rootfs": file_entry(outs.rootfs, rootfs_sha),
    }
    if outs.bundle is not None and slot_a is not None:
        artifacts["bundle"] = {**file_entry(outs.bundle), "manifest_sha256": slot_a["manifest_sha256"]}
    return artifacts


def build_manifest(
    r: Recipe,
    req: Request,
    built: rootfs.Rootfs,
    python: list[dict[str, str]],
    keys: Keys,
    seconds: dict[str, float],
    artifacts: dict[str, Any],
) -> dict[str, Any]:
    """The build manifest: what went in (recipe, sources, tools, packages, wheels, keys) and `artifacts`."""
    debs = []
    for line in built.packages:
        name, _, version = line.partition(" ")
        debs.append({"name": name, "version": version})
    return {
        "format": MANIFEST_FORMAT,
        "recipe": {
            "name": r.name,
            "file": str(req.recipe),
            "sha256": file_sha256(req.recipe),
            "compatible": r.target.compatible,
            "version": r.bundle.version,
            "security_version": r.bundle.security_version,
            "inputs": {str(p): _input_digest(p) for p in r.files_used()},
        },
        "pitstop": pitstop.__version__,
        "source_date_epoch": req.epoch,
        "reproducible": req.pinned,
        "keys": keys.where,
        "stages": {
            "base": {"key": built.base_key, "reused": built.base_reused},
            "system": {"key": built.system_key, "reused": built.system_reused},
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
        },
        "sources": rootfs.apt_sources(r),
        "tools": tool_versions(),
        "packages": debs,
        "python": python,
        "artifacts": artifacts,
    }


def _input_digest(p: Path) -> str:
    if p.is_file():
        return file_sha256(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file() or q.is_symlink()):
        h.update(str(f.relative_to(p)).encode() + b"\0")
        h.update(os.readlink(f).encode() if f.is_symlink() else bytes.fromhex(file_sha256(f)))
    return h.hexdigest()
