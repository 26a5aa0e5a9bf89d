"""Uploaded bundles: checked in one pass while copied into the data directory, stored by content.

An upload reads the file once. While the bytes are copied to a temporary file beside the store, they are
hashed (SHA-256 names the file; SHA-1 and MD5 are what hawkBit's artifact links carry) and read as a bundle
with ota's reader: the header and manifest must parse (anything else is not a bundle), the signature and its
chain must hold against the keyring when there is one, and every chunk of every payload must match the signed
manifest up to the last byte (a truncated or corrupt copy never reaches a device). Only then is the copy
synced and renamed to `artifacts/<first two hex digits>/<sha256>`, and the bundle recorded in the database.

The upload holds an exclusive lock on its file from creation until the database row is committed, so a
clean-up (`sweep`) never takes an upload in progress for the leftover of one that crashed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, cast

from pitstop import crashpoint
from pitstop.atomic import fsync_dir
from pitstop.errors import InputError
from pitstop.ota.errors import BundleError
from pitstop.ota.server import deployments
from pitstop.ota.server.errors import UploadError
from pitstop.ota.server.records import Distribution
from pitstop.ota.server.store import Store

log = logging.getLogger(__name__)

TMP_PREFIX = ".upload-"
_BLOCK = 1 << 20


def artifact_path(store: Store, sha256: str) -> Path:
    return store.artifacts_dir / sha256[:2] / sha256


class _Tee:
    """A read()-able view of the bundle that copies and hashes every byte it hands out."""

    def __init__(self, src: BinaryIO, dst: BinaryIO, on_bytes: Callable[[int], None] | None) -> None:
        self.src, self.dst = src, dst
        self.sha256, self.sha1, self.md5 = hashlib.sha256(), hashlib.sha1(), hashlib.md5()  # noqa: S324 - hawkBit's
        self.size = 0
        self._on_bytes = on_bytes

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        if data:
            self.dst.write(data)
            self.sha256.update(data)
            self.sha1.update(data)
            self.md5.update(data)
            self.size += len(data)
            if self._on_bytes is not None:
                self._on_bytes(len(data))
        return data

    def seekable(self) -> bool:
        return False

    def drain(self) -> None:
        while self.read(_BLOCK):
            pass


@dataclass(frozen=True)
class Uploaded:
    distribution: Distribution
    new: bool


def upload(
    store: Store, bundle: Path, *, keyring: Path | None, on_bytes: Callable[[int], None] | None = None
) -> Uploaded:
    """Check and store `bundle`; raises UploadError (nothing stored) when it is refused, InputError when it
    cannot be read, KeyringError when the keyring cannot."""
    from pitstop.ota.bundle_reader import Policy, open_verified, read_preamble, verify_payloads  # noqa: PLC0415
    from pitstop.ota.clock import Clock, ClockPolicy  # noqa: PLC0415
    from pitstop.ota.keyring import load_keyring  # noqa: PLC0415
    from pitstop.ota.trust import signer_info  # noqa: PLC0415

    policy = None
    if keyring is not None:
        policy = Policy(load_keyring(keyring), Clock(ClockPolicy.FLOOR, datetime.now(UTC)))
    try:
        src = open(bundle, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise InputError(f"cannot open {bundle}: {e.strerror}") from None
    sweep(store)
    with src, _staging(store) as (tmp, dst):
        tee = _Tee(src, dst, on_bytes)
        stream = cast(BinaryIO, tee)
        try:
            if policy is not None:
                vp = open_verified(stream, policy)
                m, signer = vp.manifest, vp.signer.subject
            else:
                pre = read_preamble(stream)
                m = pre.manifest
                try:
                    signer = signer_info(pre.signature_block()).subject
                except BundleError:
                    signer = None
            verify_payloads(stream, m)
        except BundleError as e:
            raise UploadError(_refusal(bundle, e, keyring)) from None
        except OSError as e:
            raise InputError(f"cannot read {bundle}: {e.strerror}") from None
        tee.drain()
        dst.flush()
        os.fsync(dst.fileno())
        sha256 = tee.sha256.hexdigest()
        crashpoint.hit("server.upload.copied")
        final = artifact_path(store, sha256)
        final.parent.mkdir(exist_ok=True)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        crashpoint.hit("server.upload.stored")
        new = deployments.NewDistribution(
            name=m.compatible,
            version=m.version,
            security_version=m.security_version,
            compatible=m.compatible,
            filename=_filename(bundle, m.version),
            sha256=sha256,
            sha1=tee.sha1.hexdigest(),
            md5=tee.md5.hexdigest(),
            size=tee.size,
            description=m.description,
            signer=signer,
            verified=policy is not None,
            manifest=m.to_json(),
        )
        dist, created = store.write(lambda c, now: deployments.add_distribution(c, now, new))
    return Uploaded(dist, created)


def _filename(bundle: Path, version: str) -> str:
    """The name devices download it under: the uploaded file's, made to end in .pitb (the agent looks for it)."""
    name = bundle.name if bundle.name.endswith(".pitb") else f"{bundle.stem or 'bundle'}-{version}.pitb"
    return "".join(c if c.isalnum() or c in "._-+" else "_" for c in name)


def _refusal(bundle: Path, e: BundleError, keyring: Path | None) -> str:
    from pitstop.ota.errors import SignatureError, TrustError  # noqa: PLC0415

    if isinstance(e, TrustError):
        return f"{bundle}: refused: {e.message} (keyring {keyring})"
    if isinstance(e, SignatureError):
        return f"{bundle}: refused: {e.message}"
    if "not a pitstop bundle" in e.message:
        return f"{bundle}: not a pitstop bundle ({e.message.removeprefix('not a pitstop bundle: ')})"
    return f"{bundle}: refused, not a valid bundle: {e.message}"


@contextlib.contextmanager
def _staging(store: Store) -> Iterator[tuple[Path, BinaryIO]]:
    """A locked temporary file in the artifact store; removed unless it was renamed into place. The lock stays
    until the caller is done (after the database commit)."""
    fd, name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".tmp", dir=store.artifacts_dir)
    tmp = Path(name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(fd, "wb", buffering=_BLOCK) as f:
            yield tmp, f
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _locked(path: Path) -> bool:
    """Whether another upload holds `path` (its lock); False when the file is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def sweep(store: Store) -> list[Path]:
    """Remove what crashed uploads left: temporary files, and stored files no bundle row names. Returns them."""
    known = set(store.read(lambda c: [r[0] for r in c.execute("SELECT sha256 FROM artifacts")]))
    removed = []
    for p in sorted(store.artifacts_dir.glob(f"{TMP_PREFIX}*")) + sorted(store.artifacts_dir.glob("??/*")):
        if (p.name.startswith(TMP_PREFIX) or p.name not in known) and not _locked(p):
            # Read again: an upload may have committed between the listing and the lock check.
            if not p.name.startswith(TMP_PREFIX) and _recorded(store, p.name):
                continue
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
                log.info("removed %s, left by an interrupted upload", p)
    return removed


def _recorded(store: Store, sha256: str) -> bool:
    return store.read(lambda c: c.execute("SELECT 1 FROM artifacts WHERE sha256 = ?", (sha256,)).fetchone()) is not None


def open_artifact(store: Store, sha256: str) -> BinaryIO:
    return open(artifact_path(store, sha256), "rb")


def check_files(store: Store, *, deep: bool = False) -> list[str]:
    """Problems with the stored files: a bundle whose file is missing, of the wrong size, or (deep) of the
    wrong content."""
    problems = []
    rows = store.read(lambda c: c.execute("SELECT sha256, size FROM artifacts").fetchall())
    for sha256, size in rows:
        p = artifact_path(store, sha256)
        try:
            actual = p.stat().st_size
        except FileNotFoundError:
            problems.append(f"artifact {sha256}: file {p} is missing")
            continue
        if actual != size:
            problems.append(f"artifact {sha256}: {actual} bytes on disk, {size} recorded")
        elif deep:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while block := f.read(_BLOCK):
                    h.update(block)
            if h.hexdigest() != sha256:
                problems.append(f"artifact {sha256}: the file's content does not match its name")
    return problems
