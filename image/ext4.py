"""ext4 images without mounting: `mkfs.ext4 -d TREE`, then `debugfs` for what mke2fs cannot be told.

Reproducible (same tree, same epoch → same bytes):

- `-U` and `-E hash_seed=` fix the filesystem UUID and the directory hash seed;
- `E2FSPROGS_FAKE_TIME` fixes every time mke2fs takes from the clock (superblock, root, lost+found);
- mke2fs 1.47.0 copies each file's atime, mtime and ctime from the tree. mtimes newer than the epoch are
  clamped in the tree before (`clamp_tree_times`); atime and ctime (which no one can set on the host) are set
  to the epoch afterwards for every inode in use, with one `debugfs -w` script (`normalize_inodes`);
- directory entries are copied in the order the host file system lists them, so the tree should be made on
  one file system in one order (what the builder does); e2fsprogs 1.47.1 sorts them itself.

Safe to flash with a block map (image/bmap.py), where unmapped ranges are not written and keep whatever the
target disk held before:

- no discard (`nodiscard`) and real zeros instead of `fallocate` zeroing (`UNIX_IO_NOZEROOUT=1`), so
  nothing mke2fs relies on being zero is a hole: the journal is written out (`lazy_journal_init=0`); a
  journal left to old disk contents could replay a stale transaction of a previous image after a crash;
- inode tables are initialised lazily (`lazy_itable_init=1`) and *not* flagged as zeroed, so the kernel
  treats them as garbage and zeroes them in the background after the first mount, as it does for any
  freshly made filesystem.

GRUB 2.06 cannot read `metadata_csum_seed` or `orphan_file` (notes/qemu-ab-image.md, pitfall 7): both off.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path

from pitstop.image.errors import ImageBuildError
from pitstop.runner import run

FIRST_INODE = 11  # lost+found; inodes 1-10 are reserved (2 is the root directory)


@functools.cache
def mke2fs_version() -> tuple[int, int]:
    res = run(["mke2fs", "-V"])
    m = re.search(rb"mke2fs (\d+)\.(\d+)", res.stderr + res.stdout)
    return (int(m[1]), int(m[2])) if m else (0, 0)


def features_off() -> str:
    off = ["^metadata_csum_seed"]
    if mke2fs_version() >= (1, 47):
        off.append("^orphan_file")
    return ",".join(off)


def fake_time_env(epoch: int) -> dict[str, str]:
    return {"E2FSPROGS_FAKE_TIME": str(epoch), "SOURCE_DATE_EPOCH": str(epoch)}


def clamp_tree_times(tree: Path, epoch: int) -> None:
    """Set every mtime in `tree` newer than `epoch` to `epoch` (and every atime to its mtime), symlinks
    included, the reproducible-builds way; older mtimes are kept."""
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [*filenames, *dirnames]:
            _clamp(os.path.join(dirpath, name), epoch)
    _clamp(str(tree), epoch)


def _clamp(path: str, epoch: int) -> None:
    st = os.lstat(path)
    mtime = min(int(st.st_mtime), epoch)
    if st.st_mtime != mtime or st.st_atime != mtime:
        os.utime(path, (mtime, mtime), follow_symlinks=False)


def make_ext4(
    out: Path,
    size: int,
    tree: Path | None,
    *,
    label: str,
    uuid: str,
    epoch: int,
    reserved_percent: int = 5,
    owner: tuple[int, int] | None = None,
) -> Path:
    """An ext4 image of `size` bytes at `out` holding `tree` (empty if None), reproducible and safe to flash
    sparsely (module docstring). `owner` (uid, gid): give every inode this owner (a tree made by an
    unprivileged build); None keeps the tree's."""
    out.unlink(missing_ok=True)
    if tree is not None:
        clamp_tree_times(tree, epoch)
    ext = f"hash_seed={uuid},root_owner=0:0,nodiscard,lazy_itable_init=1,lazy_journal_init=0"
    cmd: list[str | os.PathLike[str]] = [
        "mkfs.ext4",
        "-q",
        "-F",
        "-b",
        "4096",
        "-I",
        "256",
        "-m",
        str(reserved_percent),
        "-L",
        label,
        "-U",
        uuid,
        "-E",
        ext,
        "-O",
        features_off(),
        "-T",
        "default",
    ]
    if tree is not None:
        cmd += ["-d", tree]
    run([*cmd, out, f"{size // 1024}k"], env={**fake_time_env(epoch), "UNIX_IO_NOZEROOUT": "1"})
    normalize_inodes(out, epoch, owner=owner)
    return out


def free_inode_ranges(dumpe2fs_text: str) -> list[tuple[int, int]]:
    """(first, last) of each free inode range listed per group by dumpe2fs."""
    out = []
    for m in re.finditer(r"^\s*Free inodes: (.*)$", dumpe2fs_text, re.M):
        for item in m[1].split(","):
            item = item.strip()
            if not item:
                continue
            first, _, last = item.partition("-")
            out.append((int(first), int(last or first)))
    return out


def used_inodes(image: Path) -> Iterator[int]:
    """Inodes in use that a tree can have filled: the root directory and every inode after the reserved ones."""
    text = run(["dumpe2fs", image]).text
    m = re.search(r"^Inode count:\s+(\d+)", text, re.M)
    if m is None:
        raise ImageBuildError(f"dumpe2fs {image}: no inode count in its output")
    free = sorted(free_inode_ranges(text))
    yield 2
    ino, i = FIRST_INODE, 0
    count = int(m[1])
    while ino <= count:
        while i < len(free) and free[i][1] < ino:
            i += 1
        if i < len(free) and free[i][0] <= ino:
            ino = free[i][1] + 1
            continue
        yield ino
        ino += 1


def debugfs_script(image: Path | str, commands: list[str], *, epoch: int | None = None, what: str = "debugfs") -> str:
    """Run `commands` with `debugfs -w` on `image` (a path, or "path?offset=N"); ImageBuildError if any fails.
    debugfs itself exits 0 whatever its commands do, so its stderr is the verdict."""
    env = fake_time_env(epoch) if epoch is not None else None
    res = run(["debugfs", "-w", "-f", "-", image], input=("\n".join(commands) + "\n").encode(), env=env)
    errors = [
        ln for ln in res.stderr.decode("utf-8", "replace").splitlines() if ln.strip() and not ln.startswith("debugfs ")
    ]
    if errors:
        raise ImageBuildError(f"{what} on {image}: {errors[0]}")
    return res.text


def normalize_inodes(image: Path, epoch: int, *, owner: tuple[int, int] | None = None) -> None:
    """atime and ctime (and `owner`, if given) of every used inode set to fixed values."""
    t = f"@{epoch}"
    cmds = []
    for ino in used_inodes(image):
        cmds += [f"sif <{ino}> atime {t}", f"sif <{ino}> ctime {t}"]
        if owner is not None:
            cmds += [f"sif <{ino}> uid {owner[0]}", f"sif <{ino}> gid {owner[1]}"]
    debugfs_script(image, cmds, epoch=epoch, what="normalizing inode times")


def fsck(image: Path | str) -> None:
    """`e2fsck -fn`: ImageBuildError unless the filesystem is clean."""
    res = run(["e2fsck", "-fn", image], check=False)
    if res.returncode != 0:
        tail = (res.stdout + res.stderr).decode("utf-8", "replace").strip().splitlines()[-3:]
        raise ImageBuildError(f"e2fsck {image}: not clean (exit {res.returncode}): {' / '.join(tail)}")
