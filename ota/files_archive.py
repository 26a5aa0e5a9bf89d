"""`files` payloads: a directory tree as a deterministic tar stream, and its safe extraction.

Only regular files, directories and symlinks that stay inside the tree are allowed, both when a
bundle is created and when it is extracted. Extraction never follows a symlink it has written.
"""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from pitstop.ota.bundle_format import DEFAULT_LIMITS, Limits
from pitstop.ota.errors import BundleError, BundleLimitError, SpecError, UnsafePathError
from pitstop.ota.manifest import check_relative_path

_COPY_BUF = 1 << 20


def link_stays_inside(member: str, linkname: str) -> bool:
    """True if a symlink at `member` pointing to `linkname` resolves (lexically) inside the tree."""
    if not linkname or linkname.startswith("/") or "\0" in linkname:
        return False
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(member), linkname))
    return resolved != ".." and not resolved.startswith("../")


def check_links_resolve_inside(root: Path) -> None:
    """Every symlink under `root`, resolved through the links beside it, must land inside `root`.

    The lexical check on each link alone is not enough: `a -> ..` is harmless by itself, but
    `b -> x/a/..` with `x/a -> ..` climbs out. Resolving the finished tree catches every chain.
    """
    real_root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                target = os.path.realpath(p)
                if target != real_root and not target.startswith(real_root + os.sep):
                    rel = os.path.relpath(p, root)
                    raise UnsafePathError(f"symlink {rel} -> {os.readlink(p)} resolves outside the tree")


def write_tree(src: Path, out: BinaryIO, mtime_clamp: datetime) -> int:
    """Write `src` as a PAX tar to `out`: sorted, owner 0:0, mtimes clamped; return the entry count."""
    try:
        check_links_resolve_inside(src)
    except UnsafePathError as e:
        raise SpecError(f"{src}: {e.message}") from None
    clamp = int(mtime_clamp.timestamp())
    count = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(src, onerror=_walk_error):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, src)
            for name in sorted(dirnames + filenames):
                full = os.path.join(dirpath, name)
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                _add(tar, full, rel, clamp)
                count += 1
    return count


def _walk_error(e: OSError) -> None:
    # os.walk would skip an unreadable directory silently; a payload must not lose part of its tree.
    raise SpecError(f"cannot read {e.filename}: {e.strerror}")


def _add(tar: tarfile.TarFile, full: str, rel: str, clamp: int) -> None:
    try:
        check_relative_path(rel, "file name")
    except UnsafePathError as e:
        raise SpecError(f"{e.message}: it could not be extracted") from None
    st = os.lstat(full)
    info = tarfile.TarInfo(rel)
    info.mtime = min(int(st.st_mtime), clamp)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(full)
        if not link_stays_inside(rel, target):
            raise SpecError(f"symlink {rel} -> {target} points outside the tree")
        info.type = tarfile.SYMTYPE
        info.linkname = target
        tar.addfile(info)
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    elif stat.S_ISREG(st.st_mode):
        info.type = tarfile.REGTYPE
        info.size = st.st_size
        with open(full, "rb") as f:
            tar.addfile(info, f)
    else:
        raise SpecError(f"{rel}: only regular files, directories and symlinks can go into a files payload")


def _check_parents(root: Path, rel: str) -> None:
    cur = root
    for part in rel.split("/")[:-1]:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            raise UnsafePathError(f"archive entry {rel!r} comes before its directory") from None
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(f"archive entry {rel!r} passes through a symlink or file")


def extract_tree(stream: BinaryIO, dest: Path, limits: Limits = DEFAULT_LIMITS) -> int:
    """Extract a files payload into the empty directory `dest`; return the entry count."""
    count = 0
    dirs: list[tuple[Path, int, int]] = []
    try:
        with tarfile.open(fileobj=stream, mode="r|", format=tarfile.PAX_FORMAT) as tar:
            for member in tar:
                count += 1
                if count > limits.max_files_entries:
                    raise BundleLimitError(f"files payload has more than {limits.max_files_entries} entries")
                _extract_one(tar, member, dest, limits)
                if member.isdir():
                    dirs.append((dest / member.name, member.mode & 0o777, int(member.mtime)))
    except tarfile.TarError as e:
        raise BundleError(f"files payload is not a valid archive: {e}") from None
    check_links_resolve_inside(dest)
    # Directory modes and times last: a read-only directory must not block its own entries.
    for path, mode, mtime in reversed(dirs):
        os.chmod(path, mode)
        os.utime(path, (mtime, mtime))
    return count


def _extract_one(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, limits: Limits) -> None:
    rel = member.name
    check_relative_path(rel, "archive entry")
    _check_parents(dest, rel)
    path = dest / rel
    mode = member.mode & 0o777  # no setuid/setgid/sticky from a bundle
    if member.isdir():
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            raise BundleError(f"archive entry {rel!r} appears twice") from None
    elif member.issym():
        if not link_stays_inside(rel, member.linkname):
            raise UnsafePathError(f"symlink {rel} -> {member.linkname} points outside the tree")
        try:
            os.symlink(member.linkname, path)
        except FileExistsError:
            raise BundleError(f"archive entry {rel!r} appears twice") from None
    elif member.isreg():
        if member.size > limits.max_files_entry_size:
            raise BundleLimitError(f"archive entry {rel!r} is larger than the cap")
        src = tar.extractfile(member)
        assert src is not None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            raise BundleError(f"archive entry {rel!r} appears twice") from None
        with os.fdopen(fd, "wb") as f:
            while buf := src.read(_COPY_BUF):
                f.write(buf)
            os.fchmod(f.fileno(), mode)
        os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
    else:
        raise UnsafePathError(f"archive entry {rel!r} is not a file, directory or symlink")
