"""Block maps (`.bmap`): bmaptool's XML format, version 2.0, with a SHA-256 per range.

A block map lists the blocks of an image that hold data (its mapped ranges, found with SEEK_DATA/SEEK_HOLE in
the sparse image file); a flash writes only those and leaves the rest of the target as it was. Each range
carries the SHA-256 of its bytes, and the file carries the SHA-256 of itself (computed with that value as
64 ASCII zeros), so `bmaptool copy` and `pitstop image flash` can check both. A range's last block may be
partial when the image size is not a multiple of the block size; its hash covers the bytes up to the end.
"""

from __future__ import annotations

import hashlib
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pitstop.atomic import atomic_write
from pitstop.image import sparse
from pitstop.image.errors import BmapError

VERSION = "2.0"
BLOCK_SIZE = 4096
CHECKSUM_TYPE = "sha256"
MAX_BMAP = 64 << 20  # a bmap is read whole; a real one is far smaller
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Range:
    first: int  # block numbers, inclusive
    last: int
    sha256: str

    def bytes_in(self, block_size: int, image_size: int) -> tuple[int, int]:
        """(offset, length) in bytes; the last block of the image may be partial."""
        start = self.first * block_size
        return start, min((self.last + 1) * block_size, image_size) - start


@dataclass(frozen=True)
class Bmap:
    image_size: int
    block_size: int
    ranges: tuple[Range, ...]

    @property
    def blocks_count(self) -> int:
        return -(-self.image_size // self.block_size)

    @property
    def mapped_blocks(self) -> int:
        return sum(r.last - r.first + 1 for r in self.ranges)

    @property
    def mapped_bytes(self) -> int:
        return sum(r.bytes_in(self.block_size, self.image_size)[1] for r in self.ranges)

    def byte_ranges(self) -> list[tuple[int, int, str]]:
        return [(*r.bytes_in(self.block_size, self.image_size), r.sha256) for r in self.ranges]


def block_ranges(fd: int, size: int, block_size: int = BLOCK_SIZE) -> list[tuple[int, int]]:
    """(first, last) blocks touched by the file's data ranges, adjacent ones merged."""
    out: list[tuple[int, int]] = []
    for start, length in sparse.data_ranges(fd, 0, size):
        first, last = start // block_size, (start + length - 1) // block_size
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


def hash_range(fd: int, offset: int, length: int, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    while length:
        data = os.pread(fd, min(length, 1 << 20), offset)
        if not data:
            raise BmapError(f"unexpected end of the image at byte {offset}")
        h.update(data)
        offset += len(data)
        length -= len(data)
        if progress is not None:
            progress(len(data))
    return h.hexdigest()


def create(image: Path, *, block_size: int = BLOCK_SIZE, progress: sparse.ProgressFactory = sparse.no_progress) -> Bmap:
    """The block map of the sparse file `image`."""
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise BmapError(f"{image} is empty")
        blocks = block_ranges(fd, size, block_size)
        spans = [Range(first, last, "").bytes_in(block_size, size) for first, last in blocks]
        update = progress("block map", sum(n for _, n in spans))
        ranges = []
        for (first, last), (offset, length) in zip(blocks, spans, strict=True):
            ranges.append(Range(first, last, hash_range(fd, offset, length, update)))
    finally:
        os.close(fd)
    return Bmap(size, block_size, tuple(ranges))


def _human(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def render(bmap: Bmap) -> str:
    """The .bmap text, laid out as bmaptool writes it, with its own checksum filled in."""
    percent = bmap.mapped_blocks * 100.0 / bmap.blocks_count
    lines = [
        '<?xml version="1.0" ?>',
        "<!-- This file contains the block map for an image file, which is basically",
        "     a list of useful (mapped) block numbers in the image file. In other words,",
        "     it lists only those blocks which contain data (boot sector, partition",
        "     table, file-system metadata, files, directories, extents, etc). These",
        "     blocks have to be copied to the target device. The other blocks do not",
        "     contain any useful data and do not have to be copied to the target",
        "     device. Written by pitstop (bmaptool's format, version 2.0). -->",
        "",
        f'<bmap version="{VERSION}">',
        f"    <!-- Image size in bytes: {_human(bmap.image_size)} -->",
        f"    <ImageSize> {bmap.image_size} </ImageSize>",
        "",
        "    <!-- Size of a block in bytes -->",
        f"    <BlockSize> {bmap.block_size} </BlockSize>",
        "",
        "    <!-- Count of blocks in the image file -->",
        f"    <BlocksCount> {bmap.blocks_count} </BlocksCount>",
        "",
        f"    <!-- Count of mapped blocks: {_human(bmap.mapped_blocks * bmap.block_size)} or {percent:.1f}% -->",
        f"    <MappedBlocksCount> {bmap.mapped_blocks} </MappedBlocksCount>",
        "",
        "    <!-- Type of checksum used in this file -->",
        f"    <ChecksumType> {CHECKSUM_TYPE} </ChecksumType>",
        "",
        "    <!-- The checksum of this bmap file. When it is calculated, the value of",
        '         the checksum has to be zero (all ASCII "0" symbols).  -->',
        f"    <BmapFileChecksum> {'0' * 64} </BmapFileChecksum>",
        "",
        "    <!-- The block map which consists of elements which may either be a",
        "         range of blocks or a single block. The 'chksum' attribute",
        "         (if present) is the checksum of this blocks range. -->",
        "    <BlockMap>",
    ]
    for r in bmap.ranges:
        blocks = f"{r.first}-{r.last}" if r.last != r.first else f"{r.first}"
        lines.append(f'        <Range chksum="{r.sha256}"> {blocks} </Range>')
    lines += ["    </BlockMap>", "</bmap>", ""]
    text = "\n".join(lines)
    return text.replace("0" * 64, hashlib.sha256(text.encode()).hexdigest(), 1)


def write(path: Path, bmap: Bmap) -> None:
    atomic_write(path, render(bmap).encode())


def _int(root: ET.Element, tag: str, where: str) -> int:
    el = root.find(tag)
    if el is None or el.text is None or not el.text.strip().isdigit():
        raise BmapError(f"{where}: <{tag}> missing or not a number")
    return int(el.text.strip())


def parse(data: bytes, where: str = "bmap") -> Bmap:
    """A block map from its file content; BmapError for anything malformed or inconsistent."""
    if len(data) > MAX_BMAP:
        raise BmapError(f"{where}: larger than {MAX_BMAP >> 20} MiB; not a block map")
    try:
        # The standard parser: no external entities or DTD fetching (expat), and the input is capped above.
        root = ET.fromstring(data)  # noqa: S314
    except ET.ParseError as e:
        raise BmapError(f"{where}: not valid XML: {e}") from None
    version = root.get("version", "")
    if root.tag != "bmap" or not re.fullmatch(r"\d+\.\d+", version):
        raise BmapError(f"{where}: not a bmap file (no <bmap version=…>)")
    major, minor = (int(x) for x in version.split("."))
    if not (major == 2 or (major, minor) == (1, 4)):
        raise BmapError(f"{where}: bmap version {version} is not supported (2.x)")
    ctype = (root.findtext("ChecksumType") or "").strip()
    if ctype != CHECKSUM_TYPE:
        raise BmapError(f"{where}: checksum type {ctype!r} is not supported ({CHECKSUM_TYPE})")
    stored = (root.findtext("BmapFileChecksum") or "").strip()
    if not _HEX64.fullmatch(stored):
        raise BmapError(f"{where}: <BmapFileChecksum> missing or not a SHA-256")
    zeroed = data.replace(stored.encode(), b"0" * 64, 1)
    if hashlib.sha256(zeroed).hexdigest() != stored:
        raise BmapError(f"{where}: the file's checksum does not match (edited or damaged)")
    image_size, block_size = _int(root, "ImageSize", where), _int(root, "BlockSize", where)
    if block_size == 0 or block_size % 512 or image_size == 0:
        raise BmapError(f"{where}: block size {block_size} or image size {image_size} is impossible")
    blocks = _int(root, "BlocksCount", where)
    if blocks != -(-image_size // block_size):
        raise BmapError(f"{where}: {blocks} blocks of {block_size} bytes do not make {image_size} bytes")
    ranges: list[Range] = []
    block_map = root.find("BlockMap")
    for el in block_map.findall("Range") if block_map is not None else []:
        m = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", el.text or "")
        sha = el.get("chksum", "")
        if m is None or not _HEX64.fullmatch(sha):
            raise BmapError(f"{where}: malformed <Range> {ET.tostring(el)[:80]!r}")
        first, last = int(m[1]), int(m[2] or m[1])
        if last < first or last >= blocks or (ranges and first <= ranges[-1].last):
            raise BmapError(f"{where}: range {first}-{last} is out of order, overlapping or past the image's end")
        ranges.append(Range(first, last, sha))
    bmap = Bmap(image_size, block_size, tuple(ranges))
    if _int(root, "MappedBlocksCount", where) != bmap.mapped_blocks:
        raise BmapError(f"{where}: <MappedBlocksCount> does not match its ranges")
    return bmap


def load(path: Path) -> Bmap:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BMAP + 1)
    except OSError as e:
        raise BmapError(f"cannot read the block map {path}: {e.strerror}") from None
    return parse(data, str(path))


def default_path(image: Path) -> Path:
    """Where a block map is looked for: IMAGE.bmap (bmaptool's convention)."""
    return image.with_name(image.name + ".bmap")
