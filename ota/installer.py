"""`pitstop install`: a verified bundle streamed into the inactive slot, then the boot switched to it.

Order of work (each step leaves the device bootable if power fails right after it; docs/install.md):
 1. read and verify header, manifest, signature, chain, compatibility and anti-rollback: no writes yet;
 2. check the target slot (not booted, not mounted, big enough) and, for a local file, every payload's
    data hash, so a corrupt bundle on a USB stick is refused before anything is touched;
 3. record the target as being written (the bootloader still boots the running slot);
 4. stream each payload: chunks verified before they are written; rootfs into the slot, model/files into a
    new version directory; fsync;
 5. record the install (manifest, signature, chunk indexes) as pending;
 6. switch the bootloader to the new slot with N tries. Commit is `mark-good` after a healthy boot.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, cast

from pitstop import crashpoint
from pitstop.atomic import atomic_dir
from pitstop.errors import InputError
from pitstop.ota import bundle_format as fmt
from pitstop.ota import slot_device, slot_state
from pitstop.ota.bundle_extract import write_tree_payload
from pitstop.ota.bundle_reader import (
    PayloadLayout,
    PayloadStream,
    Policy,
    RawPreamble,
    VerifiedPreamble,
    expect_eof,
    open_verified,
    payload_pool,
    read_exact,
    read_layout,
    verify_preamble,
)
from pitstop.ota.delta_plan import make_plan
from pitstop.ota.delta_stream import DeltaStream
from pitstop.ota.device import Device, drop_pending_payloads, record_dir
from pitstop.ota.device_state import Versions
from pitstop.ota.errors import BundleError, PayloadError
from pitstop.ota.http_source import HttpOptions, HttpSource, is_url
from pitstop.ota.keyring import load_keyring
from pitstop.ota.manifest import Manifest, Payload, format_time
from pitstop.ota.seed import Seed, load_seed
from pitstop.ota.slot_state import StateError
from pitstop.ota.system_config import SystemConfig

log = logging.getLogger(__name__)

_WRITE_BATCH = 1 << 20  # one pwritev per ~1 MiB of chunks


@dataclass(frozen=True)
class InstallProgress:
    phase: str          # "check", "write"
    payload: str | None
    done: int           # bytes of payload data written so far (all payloads)
    total: int


ProgressFn = Callable[[InstallProgress], None]


@dataclass(frozen=True)
class InstallResult:
    manifest: Manifest
    slot: str | None            # the slot written (None: a bundle without rootfs)
    activated: bool             # the bootloader boots it next
    bytes_read: int             # from the source, including re-reads after a dropped connection
    bytes_seeded: int = 0       # rootfs bytes copied from the active slot instead of downloaded (delta)


@contextlib.contextmanager
def open_source(source: str, http: HttpOptions) -> Iterator[BinaryIO]:
    if is_url(source):
        with HttpSource(source, http) as src:
            yield cast(BinaryIO, src)
        return
    try:
        f = open(source, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise InputError(f"cannot open bundle {source}: {e.strerror}") from None
    with f:
        yield f


def _prescan(f: BinaryIO, m: Manifest, limits: fmt.Limits) -> None:
    """Check every payload's index, table and compressed data against the signed hashes, and the file's
    length, before anything is written. For seekable (local) sources only; rewinds afterwards."""
    start = f.tell()
    for p in m.payloads:
        f.seek(start + p.region_start)
        read_layout(f, p, limits)
        h = hashlib.sha256()
        left = p.data.size
        while left:
            b = f.read(min(left, 4 << 20))
            if not b:
                raise BundleError(f"bundle is truncated: payload {p.name!r} ends early")
            h.update(b)
            left -= len(b)
        if h.hexdigest() != p.data.sha256:
            raise PayloadError(f"compressed data of payload {p.name!r} does not match the signed manifest")
    f.seek(start + m.payload_area_size)
    expect_eof(f)
    f.seek(start)


def _version_id(m: Manifest, p: Payload) -> str:
    return f"{m.version}-{p.sha256[:12]}"


def bundle_info(vp: VerifiedPreamble, source: str) -> dict[str, Any]:
    """What the state file records about the bundle a slot holds (also written by the image builder)."""
    m = vp.manifest
    return {
        "version": m.version, "security_version": m.security_version, "compatible": m.compatible,
        "created": format_time(m.created), "manifest_sha256": hashlib.sha256(vp.preamble.manifest_bytes).hexdigest(),
        "payloads": [p.name for p in m.payloads], "signer": vp.signer.subject, "source": _recordable(source),
    }


def _recordable(source: str) -> str:
    """The source as the state file may keep it: absolute, and a URL without credentials or query (a
    download token must not end up in state.json or `status --json`)."""
    if not is_url(source):
        return os.path.abspath(source)
    u = urllib.parse.urlsplit(source)
    host = u.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{host}:{u.port}" if u.port else host
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path, "", ""))


class Installer:
    def __init__(self, cfg: SystemConfig, *, http: HttpOptions | None = None, progress: ProgressFn | None = None,
                 limits: fmt.Limits = fmt.DEFAULT_LIMITS, delta: bool = True) -> None:
        self.cfg = cfg
        self.device = Device(cfg)
        self.http = http or HttpOptions()
        self.progress = progress
        self.limits = limits
        # Over HTTP, take the rootfs chunks the booted slot holds from it (docs/delta.md).
        self.delta = delta
        self._booted: str | None = None
        self.seeded = 0

    def install(self, source: str, *, activate: bool = True) -> InstallResult:
        with self.device.locked():
            return self._install(source, activate)

    def _install(self, source: str, activate: bool) -> InstallResult:
        dev = self.device
        env, state = dev.load()
        booted = dev.booted()
        keyring = load_keyring(self.cfg.keyring)
        policy = Policy(keyring, dev.clock(state), self.cfg.compatible, state.record.committed_security_version)
        self._booted, self.seeded = booted, 0
        with open_source(source, self.http) as f:
            ranged: HttpSource | None = f if self.delta and isinstance(f, HttpSource) else None
            if ranged is not None:
                vp = self._preamble_by_ranges(ranged, policy)
                if not ranged.ranges:
                    ranged = None  # the server ignores Range: read it front to back after all
            else:
                vp = open_verified(f, policy, self.limits)
            m = vp.manifest
            rootfs = [p for p in m.payloads if p.type == "rootfs"]
            trees = [p for p in m.payloads if p.type != "rootfs"]
            if len(rootfs) > 1:
                raise BundleError("bundle has more than one rootfs payload; a device has one inactive slot")
            if not m.payloads:
                raise BundleError("bundle has no payloads")
            target: str | None = None
            new_env, rec = env, state.record
            # A model/files-only install awaiting commit is live already: a rootfs install would forget it
            # while its links still point at it. (A pending rootfs install may be overwritten: begin_install.)
            if state.pending_bundle is not None or (not rootfs and state.record.pending is not None):
                raise StateError("another install awaits commit: mark-good or mark-bad first")
            if rootfs:
                target, new_env, rec = slot_state.begin_install(env, state.record, booted)
                slot_device.check_target(self.cfg.slot(target).device, rootfs[0].size)
            for p in trees:
                dev.payloads.check_live(p.target)
            if f.seekable():
                self._report("check", None, 0, 1)
                _prescan(f, m, self.limits)
            # First write. Pending model/files versions of an interrupted install are dropped with it.
            state = replace(drop_pending_payloads(state), record=rec)
            # An activated but not yet booted target is deactivated before its record says "writing": a
            # reboot in between must not boot it while it is being overwritten.
            if new_env != env:
                dev.bootloader.write(new_env)
            dev.store.save(state)
            if ranged is not None:
                written, indexes = self._write_payloads(f, m, target, vp.preamble.header.payload_offset)
                if ranged.size is not None and ranged.size != vp.preamble.header.total_size:
                    raise BundleError("bundle has trailing bytes after its payload area")
            else:
                written, indexes = self._write_payloads(f, m, target)
                expect_eof(f)
            bytes_read = int(getattr(f, "bytes_received", f.tell()))
        info = bundle_info(vp, source)
        if target is not None:
            self._save_slot_record(target, vp, info["manifest_sha256"][:16], indexes)
            rec = slot_state.finish_install(state.record, target, info)
        payloads = dict(state.payloads)
        for p in trees:
            old = payloads.get(p.target, Versions())
            payloads[p.target] = replace(old, pending=_version_id(m, p))
        floor = max(state.time_floor, m.created) if state.time_floor else m.created
        state = replace(state, record=rec, payloads=payloads, time_floor=floor, pending_rootfs=target is not None,
                        pending_bundle=None if target is not None else info)
        dev.store.save(state)
        activated = target is not None and activate
        if activated:
            assert target is not None
            self.activate(target)
        dev.reconcile_links()
        log.info("installed %s %s (%d bytes written)", m.version, f"into slot {target}" if target else "", written)
        return InstallResult(m, target, activated, bytes_read, self.seeded)

    def activate(self, target: str) -> None:
        dev = self.device
        env, state = dev.load()
        new_env, rec = slot_state.activate(env, state.record, target, self.cfg.bootloader.tries, dev.boot_id())
        dev.store.save(replace(state, record=rec))
        crashpoint.hit("activate")
        dev.bootloader.write(new_env)

    # -- payloads --------------------------------------------------------------------------------------------

    def _report(self, phase: str, payload: str | None, done: int, total: int) -> None:
        if self.progress:
            self.progress(InstallProgress(phase, payload, done, total))

    def _preamble_by_ranges(self, src: HttpSource, policy: Policy) -> VerifiedPreamble:
        """Header, manifest and signature with requests for exactly their bytes (a delta install reads no
        more of the bundle than it needs); tells whether the server honours Range at all."""
        src.window(0, fmt.HEADER_SIZE)
        header = fmt.decode_header(read_exact(src, fmt.HEADER_SIZE, "header"), self.limits)
        src.window(fmt.HEADER_SIZE, header.payload_offset if src.ranges else None)
        raw = RawPreamble(header, read_exact(src, header.manifest_size, "manifest"),
                          read_exact(src, header.signature_size, "signature block"))
        return verify_preamble(raw, policy, self.limits)

    def _write_payloads(self, f: BinaryIO, m: Manifest, target: str | None,
                        ranged_base: int | None = None) -> tuple[int, dict[str, bytes]]:
        """Stream every payload. With `ranged_base` (the payload area's offset in an HTTP bundle whose
        server honours Range), each part is requested on its own and the rootfs goes through a delta."""
        total = sum(p.size for p in m.payloads)
        done = 0
        indexes: dict[str, bytes] = {}
        with payload_pool() as pool:
            for p in m.payloads:
                if ranged_base is not None:
                    assert isinstance(f, HttpSource)
                    f.window(ranged_base + p.region_start, ranged_base + p.data.offset)
                layout = read_layout(f, p, self.limits)
                indexes[p.name] = layout.index_bytes
                chunks: Iterable[bytes]
                if ranged_base is not None and p.type == "rootfs":
                    assert isinstance(f, HttpSource)
                    chunks = self._delta(f, p, layout, ranged_base, pool)
                else:
                    if ranged_base is not None:
                        assert isinstance(f, HttpSource)
                        f.window(ranged_base + p.data.offset, ranged_base + p.region_end)
                    chunks = PayloadStream(f, p, layout, pool, compressed_hash=False)
                self._report("write", p.name, done, total)

                def counted(it: Iterator[bytes], name: str = p.name) -> Iterator[bytes]:
                    nonlocal done
                    for c in it:
                        done += len(c)
                        self._report("write", name, done, total)
                        yield c

                if p.type == "rootfs":
                    assert target is not None
                    self._write_slot(self.cfg.slot(target).device, counted(iter(chunks)))
                else:
                    with self.device.payloads.stage(p.target, _version_id(m, p)) as tmp:
                        write_tree_payload(p, counted(iter(chunks)), tmp, self.limits)
        return done, indexes

    def _delta(self, src: HttpSource, p: Payload, layout: PayloadLayout, base: int,
               pool: ThreadPoolExecutor) -> Iterable[bytes]:
        booted = self._booted
        assert booted is not None
        seed = None
        with contextlib.suppress(KeyError):
            seed = load_seed(self.cfg.state_dir, booted, self.cfg.slot(booted).device, p, self.limits)
        if seed is None:
            seed = Seed(self.cfg.slot(booted).device, {}, "none")
        plan = make_plan(layout.index, layout.sizes, base + p.data.offset, seed.offsets)
        log.info("delta: %d of %d chunks (%d of %d bytes) from slot %s (%s); downloading %d bytes in %d request(s)",
                 plan.seeded_chunks, plan.chunks, plan.seeded_bytes, p.size, booted, seed.origin,
                 plan.download_bytes, len(plan.fetches))
        stream = DeltaStream(src, p, layout.index.ids, plan, seed, pool)
        yield from stream
        self.seeded += stream.seeded_bytes
        if stream.fallback_chunks:
            log.warning("delta: %d chunk(s) of slot %s did not match their record and were downloaded",
                        stream.fallback_chunks, booted)

    @staticmethod
    def _write_slot(device: Path, chunks: Iterator[bytes]) -> None:
        fd = slot_device.open_for_write(device)
        try:
            offset, batch, size = 0, [], 0
            for c in chunks:
                batch.append(c)
                size += len(c)
                if size >= _WRITE_BATCH:
                    slot_device.write_vector(fd, batch, offset)
                    offset += size
                    batch, size = [], 0
                crashpoint.hit("slot-write")
            slot_device.write_vector(fd, batch, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _save_slot_record(self, slot: str, vp: VerifiedPreamble, name: str, indexes: dict[str, bytes]) -> None:
        """Keep the manifest, signature and chunk indexes of what the slot now holds (delta updates reuse
        the indexes). A fresh directory per install, renamed into place; the older one is removed after."""
        base = record_dir(self.cfg.state_dir, slot)
        base.mkdir(parents=True, exist_ok=True)
        final = base / name
        if not final.exists():
            with atomic_dir(final) as tmp:
                (tmp / "manifest.json").write_bytes(vp.preamble.manifest_bytes)
                (tmp / "signature.json").write_bytes(vp.preamble.signature_bytes)
                for name_, index in indexes.items():
                    (tmp / f"{name_}.caibx").write_bytes(index)
        for old in base.iterdir():
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

