"""Creating and (re-)signing bundles.

Payloads are chunked on the calling thread while a thread pool compresses chunks; compressed data is
spooled next to the output, then header, manifest, signature and payload regions are written to a
temporary file that replaces the output only once complete.
"""

from __future__ import annotations

import collections
import hashlib
import os
import struct
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pitstop.atomic import atomic_file
from pitstop.ota import bundle_format as fmt
from pitstop.ota import caibx
from pitstop.ota.bundle_reader import read_preamble
from pitstop.ota.bundle_spec import BundleSpec, PayloadSpec
from pitstop.ota.chunks import compress_chunk, iter_chunks
from pitstop.ota.errors import BundleError
from pitstop.ota.files_archive import write_tree
from pitstop.ota.manifest import Manifest, Payload, Region
from pitstop.ota.signing import Signer, sign_manifest

ProgressFn = Callable[[int], None]
_COPY = 8 << 20


@dataclass
class _Spooled:
    spec: PayloadSpec
    size: int
    sha256: str
    index: bytes
    table: bytes
    data_path: Path
    data_size: int
    data_sha256: str


def _worker_count() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _spool_payload(spec: PayloadSpec, bundle: BundleSpec, source: BinaryIO, tmp: Path,
                   pool: ThreadPoolExecutor, progress: ProgressFn | None) -> _Spooled:
    cmin, cavg, cmax = bundle.chunking
    full = hashlib.sha256()
    data_hash = hashlib.sha256()
    ends: list[int] = []
    ids: list[bytes] = []
    sizes: list[int] = []
    pending: collections.deque[tuple[int, Future[tuple[bytes, bytes]]]] = collections.deque()
    offset = 0
    data_path = tmp / f"{spec.name}.data"
    with open(data_path, "wb") as out:

        def drain(limit: int) -> None:
            while len(pending) > limit:
                end, fut = pending.popleft()
                cid, frame = fut.result()
                out.write(frame)
                data_hash.update(frame)
                ends.append(end)
                ids.append(cid)
                sizes.append(len(frame))

        for chunk in iter_chunks(source, cmin, cavg, cmax):
            full.update(chunk)
            offset += len(chunk)
            pending.append((offset, pool.submit(compress_chunk, chunk, bundle.zstd_level)))
            drain(4 * _worker_count())
            if progress:
                progress(len(chunk))
        drain(0)
    index = caibx.encode(caibx.ChunkIndex(cmin, cavg, cmax, tuple(ends), tuple(ids)))
    table = struct.pack(f"<{len(sizes)}I", *sizes)
    return _Spooled(spec, offset, full.hexdigest(), index, table, data_path, sum(sizes), data_hash.hexdigest())


def _open_source(spec: PayloadSpec, bundle: BundleSpec, tmp: Path) -> BinaryIO:
    if spec.type == "files":
        tar_path = tmp / f"{spec.name}.tar"
        with open(tar_path, "wb") as f:
            write_tree(spec.source, f, bundle.created)
        return open(tar_path, "rb")
    return open(spec.source, "rb")


def source_size(spec: PayloadSpec) -> int:
    """Bytes that will be chunked: the file, or for a tree the size of its tar stream (headers and
    512-byte padding per entry, the end-of-archive record; PAX headers for long names aside)."""
    if spec.type == "files":
        total = 0
        for d, dirs, names in os.walk(spec.source):
            total += 512 * len(dirs)
            for name in names:
                total += 512 + -(-os.lstat(os.path.join(d, name)).st_size // 512) * 512
        return -(-(total + 1024) // 10240) * 10240
    with open(spec.source, "rb") as f:
        return f.seek(0, os.SEEK_END)


def _build_manifest(bundle: BundleSpec, spooled: list[_Spooled]) -> Manifest:
    payloads = []
    cursor = 0
    for s in spooled:
        index = Region(cursor, len(s.index), hashlib.sha256(s.index).hexdigest())
        table = Region(index.end, len(s.table), hashlib.sha256(s.table).hexdigest())
        data = Region(table.end, s.data_size, s.data_sha256)
        cursor = data.end
        model = None
        if s.spec.type == "model":
            model = {"file": s.spec.source.name, "description": s.spec.model_description or {}}
        payloads.append(Payload(
            s.spec.name, s.spec.type, s.spec.target, s.size, s.sha256, len(s.table) // 4, "sha256",
            bundle.chunking, index, table, data, model,
        ))
    return Manifest(bundle.version, bundle.security_version, bundle.compatible, bundle.created, cursor,
                    tuple(payloads), bundle.description)


def copy_bytes(src: BinaryIO, dst: BinaryIO, size: int) -> None:
    """Copy exactly `size` bytes from src's current position to dst's, in the kernel where possible.

    Both are buffered Python files: the kernel copy uses explicit offsets from their logical
    positions (a reader may have read ahead), and both positions are moved past the copy after.
    """
    dst.flush()
    src_pos, dst_pos = src.tell(), dst.tell()
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src.fileno(), dst.fileno(), min(size - done, 1 << 30), src_pos + done,
                                   dst_pos + done)
            if n == 0:
                break
            done += n
    except OSError:
        pass
    src.seek(src_pos + done)
    dst.seek(dst_pos + done)
    while done < size:
        buf = src.read(min(size - done, _COPY))
        if not buf:
            raise BundleError("bundle is truncated: payload area ends early")
        dst.write(buf)
        done += len(buf)


def _write(output: Path, manifest_bytes: bytes, sig: bytes, payload_area_size: int,
           write_payloads: Callable[[BinaryIO], None]) -> None:
    header = fmt.encode_header(fmt.Header(len(manifest_bytes), len(sig), payload_area_size))
    with atomic_file(output) as out:
        out.write(header)
        out.write(manifest_bytes)
        out.write(sig)
        write_payloads(out)


def create_bundle(bundle: BundleSpec, output: Path, signer: Signer | None = None,
                  progress: ProgressFn | None = None) -> Manifest:
    """Build the bundle described by `bundle` at `output`; unsigned when no signer is given."""
    output = Path(output)
    with tempfile.TemporaryDirectory(prefix=".pitstop-create-", dir=output.parent) as tmpdir, \
            ThreadPoolExecutor(_worker_count(), thread_name_prefix="compress") as pool:
        tmp = Path(tmpdir)
        spooled = []
        for spec in bundle.payloads:
            with _open_source(spec, bundle, tmp) as src:
                spooled.append(_spool_payload(spec, bundle, src, tmp, pool, progress))
        manifest = _build_manifest(bundle, spooled)
        manifest_bytes = manifest.encode()
        sig = sign_manifest(signer, manifest_bytes, manifest.created).encode() if signer else b""

        def payloads(out: BinaryIO) -> None:
            for s in spooled:
                out.write(s.index)
                out.write(s.table)
                with open(s.data_path, "rb") as f:
                    copy_bytes(f, out, s.data_size)

        _write(output, manifest_bytes, sig, manifest.payload_area_size, payloads)
    return manifest


def sign_bundle(source: Path, output: Path, signer: Signer) -> Manifest:
    """Write `source` with a new signature to `output` (which may be `source` itself)."""
    with open(source, "rb") as f:
        pre = read_preamble(f)
        sig = sign_manifest(signer, pre.manifest_bytes, pre.manifest.created).encode()

        def payloads(out: BinaryIO) -> None:
            copy_bytes(f, out, pre.header.payload_area_size)
            if f.read(1):
                raise BundleError("bundle has trailing bytes after its payload area")

        _write(Path(output), pre.manifest_bytes, sig, pre.header.payload_area_size, payloads)
    return pre.manifest

