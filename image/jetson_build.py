"""`pitstop image build` for a Jetson recipe (`bootloader = "nvbootctrl"`): pitstop's arm64 rootfs, NVIDIA's
flashing configuration for it, and, given a BSP (`--l4t DIR`), NVIDIA's tools run on it (docs/jetson-flashing.md).

    keys → wheels → base → system → rootfs tree (overlay) → OUT/NAME.rootfs.tar
         → flash configuration (OUT/NAME.flash/: flash-config.json, flash.env, flash.sh)
    without a BSP: stop there, and say what a BSP must have
    with a BSP:    patched A/B layout → rootfs into Linux_for_Tegra/rootfs → apply_binaries.sh (+ JetPack .debs)
                   → nv-l4t-bootloader-config masked → NVIDIA's flash (unless --no-flash)
                   → OUT/NAME.rootfs.ext4 and the first bundle, both from Linux_for_Tegra/rootfs

The first bundle is made from the BSP's rootfs/ after NVIDIA's tools ran: it holds NVIDIA's userspace, and flash.sh
edits rootfs/boot (extlinux.conf, the FDT line, signatures) while it flashes. A bundle without them would install a
slot without CUDA or with another boot configuration.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pitstop.atomic import atomic_write
from pitstop.image import build, jetson, rootfs
from pitstop.image.datafs import file_sha256
from pitstop.image.progress import Stages
from pitstop.image.recipe import Recipe
from pitstop.runner import run

FLASH_CONFIG = "flash-config.json"
FLASH_ENV = "flash.env"
FLASH_SCRIPT = "flash.sh"


@dataclass(frozen=True)
class L4t:
    """What NVIDIA's side of the build gets: the BSP (None: stop before it), more .debs, whether to flash."""

    bsp: Path | None = None
    debs: tuple[Path, ...] = ()
    flash: bool = True
    host: jetson.Host | None = None  # None: this machine


@dataclass(frozen=True)
class Outputs:
    rootfs_tar: Path
    flash_dir: Path
    rootfs: Path  # ext4, only made with a BSP
    bundle: Path | None
    manifest: Path

    @staticmethod
    def of(r: Recipe, out: Path, bundle: bool) -> Outputs:
        return Outputs(
            rootfs_tar=out / f"{r.name}.rootfs.tar",
            flash_dir=out / f"{r.name}.flash",
            rootfs=out / f"{r.name}.rootfs.ext4",
            bundle=out / f"{r.name}-{r.bundle.version}.pitb" if bundle else None,
            manifest=out / f"{r.name}.manifest.json",
        )


@dataclass
class Result:
    outputs: Outputs
    manifest: dict[str, Any]
    config: jetson.FlashConfig
    missing: list[str] = field(default_factory=list)  # without a BSP: what one must have
    integrated: bool = False  # the rootfs went through NVIDIA's apply_binaries
    flashed: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)


def flash_config(r: Recipe, layout: Path | None = None) -> jetson.FlashConfig:
    """NVIDIA's command for the recipe: its board, slot size (`partitions.rootfs`), tries (ROOTFS_RETRY_COUNT_MAX)."""
    return jetson.flash_config(
        r.target.board,
        r.partitions.rootfs,
        retry_count_max=r.boot.tries,
        layout=str(layout) if layout is not None else None,
    )


def flash_files(r: Recipe, config: jetson.FlashConfig, *, patched_layout: bool) -> dict[str, bytes]:
    """The files of OUT/NAME.flash/: the configuration as data, as NVIDIA's variables, and as a script."""
    assert r.partitions.data is not None  # the recipe check requires it for a Jetson
    data = {
        **config.to_dict(),
        "compatible": r.target.compatible,
        "data_partition": jetson.DATA_PARTITION,
        "data_size": r.partitions.data,
        # Without the BSP's own layout there is nothing to patch: NVIDIA's stock UDA size applies.
        "data_size_applied": patched_layout,
    }
    return {
        FLASH_CONFIG: (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(),
        FLASH_ENV: jetson.render_flash_env(config).encode(),
        FLASH_SCRIPT: jetson.render_flash_script(config).encode(),
    }


def write_flash_files(files: dict[str, bytes], flash_dir: Path) -> None:
    flash_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        atomic_write(flash_dir / name, data, mode=0o755 if name.endswith(".sh") else 0o644)


def missing_without_bsp(board: jetson.Board) -> list[str]:
    """What `--l4t DIR` must point at, one line each (the same items `check_bsp` looks for)."""
    return [f"{rel} ({why})" for rel, _kind, why in jetson.bsp_requirements(board)]


def tar_tree(tree: Path, out: Path) -> None:
    """`tree` as a tarball at `out` (numeric owners, modes, extended attributes such as file capabilities)."""
    tmp = out.with_name(f".{out.name}.tmp")
    run(
        [
            "tar",
            "--create",
            "--file",
            tmp,
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--acls",
            "--sort=name",
            "--directory",
            tree,
            ".",
        ]
    )
    os.replace(tmp, out)


def check_early(r: Recipe, l4t: L4t, host: jetson.Host) -> None:
    """With a BSP, everything that would stop NVIDIA's side is checked before the long rootfs build."""
    if l4t.bsp is None:
        return
    config = flash_config(r)
    problems = jetson.integration_problems(l4t.bsp.absolute(), config, host)
    problems += [f"{d}: not a .deb file" for d in l4t.debs if not (d.is_file() and d.name.endswith(".deb"))]
    if not problems:
        # The BSP's layout must take pitstop's sizes (an A/B layout, with UDA, sizes on its alignment).
        try:
            xml = (l4t.bsp / config.board.layout).read_bytes()
            jetson.check_layout(xml)
            jetson.patch_layout(xml, config.slot_size, r.partitions.data)
        except OSError as e:
            problems.append(f"{l4t.bsp / config.board.layout}: cannot read the layout: {e.strerror}")
        except jetson.JetsonFlashError as e:
            problems.append(f"{l4t.bsp / config.board.layout}: {e.message}")
    if not problems and l4t.flash:
        problems += jetson.flash_problems(config, host)
    if problems:
        raise jetson.JetsonFlashError("cannot build for the BSP (nothing was built):\n  " + "\n  ".join(problems))


def build_jetson(req: build.Request, l4t: L4t, stages: Stages) -> Result:
    r, keys = build.prepare(req, "nvbootctrl")
    host = l4t.host or jetson.Host.current()
    board = jetson.board(r.target.board)
    check_early(r, l4t, host)
    outs = Outputs.of(r, req.output, req.bundle)
    outs.manifest.unlink(missing_ok=True)  # a manifest only ever describes a finished build
    cache = rootfs.Cache(req.cache.resolve())
    result = Result(outs, {}, flash_config(r))
    bsp = l4t.bsp.absolute() if l4t.bsp is not None else None
    rootfs_sha: str | None = None
    slot_a: dict[str, Any] | None = None
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".pitstop-build-", dir=req.output)))
        with stages.step("wheels", "pitstop's wheel and its dependencies'"):
            wheels = rootfs.wheelhouse(req.source, work / "wheels", cache, arch=r.target.arch)
        python = build.python_packages(wheels)
        with stages.step("rootfs", "base (mmdebstrap), system (accounts, pitstop), overlay") as st:
            inputs = build.tree_inputs(req, cache, keys, wheels, st)
            tree, base, system = stack.enter_context(rootfs.rootfs_tree(r, inputs))
        result.reused.update(base=base.reused, system=system.reused)
        with stages.step("tar", f"{outs.rootfs_tar.name}: pitstop's rootfs, for Linux_for_Tegra/rootfs"):
            tar_tree(tree, outs.rootfs_tar)
        if bsp is not None:
            with stages.step("layout", "NVIDIA's A/B layout with pitstop's slot and data sizes"):
                size = result.config.slot_size
                layout = jetson.write_patched_layout(bsp, board, size, outs.flash_dir, r.partitions.data)
                result.config = flash_config(r, layout)
            with stages.step("l4t", "rootfs into the BSP, apply_binaries.sh, NVIDIA's commit service masked"):
                rootfs.ensure_binfmt(rootfs.DEB_ARCH[r.target.arch])
                jetson.integrate(bsp, tree, result.config, debs=l4t.debs, host=host)
            result.integrated = True
        write_flash_files(flash_files(r, result.config, patched_layout=bsp is not None), outs.flash_dir)
        if bsp is None:
            result.missing = missing_without_bsp(board)
        else:
            rootfs_sha, slot_a = _flash_and_bundle(r, req, l4t, host, keys, result, bsp, work, stages)
    result.seconds = stages.seconds
    built = rootfs.Rootfs(outs.rootfs, base.reused, system.reused, system.packages, base.key, system.key)
    result.manifest = build.build_manifest(
        r, req, built, python, keys, result.seconds, artifacts(result, rootfs_sha, slot_a)
    )
    result.manifest["jetson"] = {
        "board": board.board_config,
        "l4t": str(bsp) if bsp else None,
        "l4t_release": jetson.bsp_release(bsp) if bsp else None,
        "debs": [d.name for d in l4t.debs],
        "integrated": result.integrated,
        "flashed": result.flashed,
        "command": result.config.command_line(),
    }
    atomic_write(outs.manifest, (json.dumps(result.manifest, indent=2, sort_keys=True) + "\n").encode())
    return result


def _flash_and_bundle(
    r: Recipe,
    req: build.Request,
    l4t: L4t,
    host: jetson.Host,
    keys: build.Keys,
    result: Result,
    bsp: Path,
    work: Path,
    stages: Stages,
) -> tuple[str, dict[str, Any] | None]:
    """NVIDIA's flash (unless --no-flash), then the rootfs image and the first bundle from the BSP's rootfs/.
    Returns the image's SHA-256 and what slot a records for the bundle."""
    outs = result.outputs
    integrated = bsp / "rootfs"
    # The slot must hold what NVIDIA's tools made of the tree: refused here, before anything is flashed.
    used, inodes = rootfs.tree_usage(integrated)
    rootfs.fs_size(used, inodes, r.partitions.rootfs)
    if l4t.flash:
        with stages.step("flash", result.config.command_line()):
            jetson.flash(bsp, result.config, host=host)
        result.flashed = True
    rootfs_tmp = work / outs.rootfs.name
    with stages.step("ext4", f"{outs.rootfs.name} from {integrated}"):
        rootfs.make_rootfs_image(r, integrated, rootfs_tmp, epoch=req.epoch)
    slot_a: dict[str, Any] | None = None
    if outs.bundle is not None:
        with stages.step("bundle", f"{outs.bundle.name}, signed with {keys.where}"):
            slot_a = build.first_bundle(
                r, rootfs_tmp, work / outs.bundle.name, keys, req.epoch, stages, source=outs.bundle
            )
            os.replace(work / outs.bundle.name, outs.bundle)
    sha = file_sha256(rootfs_tmp)
    os.replace(rootfs_tmp, outs.rootfs)
    return sha, slot_a


def artifacts(result: Result, rootfs_sha: str | None, slot_a: dict[str, Any] | None) -> dict[str, Any]:
    o = result.outputs
    out: dict[str, Any] = {
        "rootfs_tar": build.file_entry(o.rootfs_tar),
        "flash": {name: build.file_entry(o.flash_dir / name) for name in sorted(os.listdir(o.flash_dir))},
    }
    if rootfs_sha is not None:
        out["rootfs"] = build.file_entry(o.rootfs, rootfs_sha)
    if o.bundle is not None and slot_a is not None:
        out["bundle"] = {**build.file_entry(o.bundle), "manifest_sha256": slot_a["manifest_sha256"]}
    return out


def summary(res: Result) -> list[str]:
    """What the CLI prints after the outputs: what NVIDIA's side did, or what it needs."""
    cfg = res.config
    if res.missing:
        return [
            "NVIDIA's tools were not run: no BSP given (--l4t DIR, NVIDIA Jetson Linux "
            f"{cfg.board.l4t_release}, {jetson.BSP_DOWNLOAD}). Linux_for_Tegra must have:",
            *(f"  {m}" for m in res.missing),
            "The data partition keeps NVIDIA's stock size until the BSP's layout is patched (--l4t).",
        ]
    if res.flashed:
        return [f"flashed {cfg.board.board_config} with rootfs A/B: {cfg.command_line()}"]
    return [
        "not flashed (--no-flash); the BSP's rootfs/ is ready. Flash with, in the BSP directory:",
        f"  {cfg.command_line()}",
        "NVIDIA's flash tool then edits rootfs/boot (extlinux.conf): make update bundles after a flash.",
    ]


def debs_in(directory: Path | None) -> tuple[Path, ...]:
    """Every .deb in `directory` (sorted), for --l4t-debs."""
    if directory is None:
        return ()
    return tuple(sorted(p for p in directory.iterdir() if p.name.endswith(".deb")))
