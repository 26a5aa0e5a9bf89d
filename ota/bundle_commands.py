"""`pitstop bundle …` and `pitstop keys …`: what each command does (the arguments are in cli.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from pitstop.errors import InputError, UsageError
from pitstop.ota import bundle_spec, devkeys
from pitstop.ota.bundle_diff import diff_bundles
from pitstop.ota.bundle_extract import extract_payload
from pitstop.ota.bundle_reader import Policy, open_verified, read_preamble, verify_payloads
from pitstop.ota.bundle_writer import create_bundle, sign_bundle, source_size
from pitstop.ota.casync_export import export_casync
from pitstop.ota.clock import RELEASE_TIME_FLOOR, Clock, ClockPolicy
from pitstop.ota.errors import SignatureError
from pitstop.ota.keyring import load_keyring
from pitstop.ota.manifest import Manifest
from pitstop.ota.signing import Signer, signer_from_options
from pitstop.ota.trust import signer_info
from pitstop.progress import Progress, human_size


def _signer(args: argparse.Namespace) -> Signer | None:
    return signer_from_options(args.key, args.sign_command, args.cert)


def _parse_floor(value: str | None) -> datetime:
    if value is None:
        return RELEASE_TIME_FLOOR
    for f in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%d"):
        try:
            return datetime.strptime(value, f).replace(tzinfo=UTC)
        except ValueError:
            continue
    raise UsageError(f"--time-floor {value!r}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ")


def _policy(args: argparse.Namespace) -> Policy:
    clock = Clock(ClockPolicy(args.clock), datetime.now(UTC), _parse_floor(args.time_floor))
    return Policy(load_keyring(args.keyring), clock, args.compatible, args.min_security_version)


@contextlib.contextmanager
def _open(path: Path) -> Iterator[BinaryIO]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise InputError(f"cannot open {path}: {e.strerror}") from None
    try:
        yield f
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    finally:
        f.close()


def _progress(args: argparse.Namespace, label: str, total: int) -> Progress:
    return Progress(label, total, enabled=not args.quiet)


def _payload_total(m: Manifest) -> int:
    return sum(p.size for p in m.payloads)


def _chunking(value: str | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    try:
        a, b, c = (int(x) for x in value.split(":"))
    except ValueError:
        raise UsageError(f"--chunk-size {value!r}: expected MIN:AVG:MAX in bytes") from None
    return a, b, c


def cmd_create(args: argparse.Namespace) -> int:
    if args.spec:
        flags = (
            args.payload,
            args.bundle_version,
            args.security_version,
            args.compatible,
            args.description,
            args.chunk_size,
            args.zstd_level,
        )
        if any(v not in (None, [], "") for v in flags):
            raise UsageError("give a spec file or the bundle flags (--version, --payload, --chunk-size, ...), not both")
        spec = bundle_spec.load_spec(args.spec)
    else:
        missing = [
            f
            for f, v in (
                ("--version", args.bundle_version),
                ("--security-version", args.security_version),
                ("--compatible", args.compatible),
            )
            if v is None
        ]
        if missing:
            raise UsageError(f"without a spec file, {', '.join(missing)} is required")
        payloads = [bundle_spec.parse_payload_flag(v) for v in args.payload]
        spec = bundle_spec.spec_from_flags(
            args.bundle_version,
            args.security_version,
            args.compatible,
            payloads,
            args.description,
            _chunking(args.chunk_size),
            3 if args.zstd_level is None else args.zstd_level,
        )
    signer = _signer(args)
    if not args.output.parent.is_dir():
        raise InputError(f"output directory {args.output.parent} does not exist")
    bar = _progress(args, "create", sum(bundle_spec_size(p) for p in spec.payloads))
    m = create_bundle(spec, args.output, signer, progress=bar.update)
    bar.finish()
    state = "signed" if signer else "unsigned"
    print(f"created {args.output}: {state}, version {m.version}, {len(m.payloads)} payload(s)")
    return 0


def bundle_spec_size(p: bundle_spec.PayloadSpec) -> int:
    try:
        return source_size(p)
    except OSError as e:
        raise InputError(f"cannot read {p.source}: {e.strerror}") from None


def cmd_sign(args: argparse.Namespace) -> int:
    signer = _signer(args)
    if signer is None:
        raise UsageError("sign needs --key or --sign-command, and --cert")
    out = args.output or args.bundle
    try:
        sign_bundle(args.bundle, out, signer)
    except FileNotFoundError:
        raise InputError(f"cannot open {args.bundle}: no such file") from None
    print(f"signed {out} as {signer.certificates[0].subject.rfc4514_string()}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    policy = _policy(args)
    with _open(args.bundle) as f:
        vp = open_verified(f, policy)
        bar = _progress(args, "verify", _payload_total(vp.manifest))
        verify_payloads(f, vp.manifest, bar.update)
        bar.finish()
    m = vp.manifest
    if args.json:
        print(json.dumps({"ok": True, "manifest": m.to_json(), "signer": vp.signer.to_json()}, indent=2))
    else:
        print(
            f"{args.bundle}: OK — version {m.version}, security_version {m.security_version}, "
            f"compatible {m.compatible}, {len(m.payloads)} payload(s), signed by {vp.signer.subject}"
        )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with _open(args.bundle) as f:
        pre = read_preamble(f)
        actual = os.fstat(f.fileno()).st_size
    complete = actual == pre.header.total_size
    state = "" if complete else (", TRUNCATED" if actual < pre.header.total_size else ", TRAILING BYTES")
    m = pre.manifest
    try:
        signer: dict[str, Any] | None = signer_info(pre.signature_block()).to_json()
    except SignatureError:
        signer = None
    if args.json:
        print(
            json.dumps(
                {
                    "manifest": m.to_json(),
                    "signer": signer,
                    "size": actual,
                    "expected_size": pre.header.total_size,
                    "complete": complete,
                    "verified": False,
                },
                indent=2,
            )
        )
        return 0
    out = sys.stdout
    out.write(f"bundle      {args.bundle} ({human_size(actual)}{state})\n")
    out.write(f"version     {m.version}\nsecurity    {m.security_version}\ncompatible  {m.compatible}\n")
    out.write(f"created     {m.created:%Y-%m-%dT%H:%M:%SZ}\n")
    if m.description:
        out.write(f"description {m.description}\n")
    if signer:
        out.write(f"signer      {signer['subject']} ({signer['algorithm']}; not verified — use 'bundle verify')\n")
        out.write(f"            valid {signer['not_before']} to {signer['not_after']}\n")
    else:
        out.write("signer      none (unsigned)\n")
    out.write(f"payloads    {len(m.payloads)}\n")
    for p in m.payloads:
        ratio = p.data.size / p.size if p.size else 1.0
        out.write(
            f"  {p.name:<16} {p.type:<7} -> {p.target:<20} {human_size(p.size):>10}  "
            f"{p.chunks} chunks, {human_size(p.data.size)} compressed ({ratio:.0%})\n"
        )
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    policy = _policy(args)
    with _open(args.bundle) as f:
        vp = open_verified(f, policy)
        p = vp.manifest.payload(args.payload)
        bar = _progress(args, "extract", p.size)
        extract_payload(f, vp.manifest, args.payload, args.output, progress=bar.update)
        bar.finish()
    print(f"extracted payload {p.name!r} ({p.type}, {human_size(p.size)}) to {args.output}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    with _open(args.old) as f:
        old_rootfs = sum(p.size for p in read_preamble(f).manifest.payloads if p.type == "rootfs")
    # Drawn only when OLD's rootfs has to be chunked again (other chunking than NEW's).
    bar = Progress("diff", old_rootfs, enabled=not args.quiet and not args.json)
    try:
        d = diff_bundles(args.old, args.new, progress=bar.update)
    except OSError as e:
        raise InputError(f"cannot read {e.filename or 'a bundle'}: {e.strerror or e}") from None
    if bar.done:
        bar.finish()
    if args.json:
        print(json.dumps(d.to_json(), indent=2))
        return 0
    out = sys.stdout
    out.write(f"{args.old} ({d.old_version}) -> {args.new} ({d.new_version}); signatures not checked\n")
    for p in d.payloads:
        line = f"  {p.name:<16} {p.type:<7} {human_size(p.size):>10}  "
        if p.type == "rootfs":
            where = {"index": "OLD's chunk index", "chunked": "OLD's rootfs, chunked again"}.get(p.seed, "nothing")
            line += (
                f"{p.reused_chunks} of {p.chunks} chunks ({human_size(p.reused_bytes)}) reused from {where}; "
                f"download {human_size(p.download)} in {p.requests} request(s)"
            )
        else:
            line += f"downloaded whole: {human_size(p.download)} in {p.requests} request(s)"
        out.write(line + "\n")
    share = d.download / d.new_size if d.new_size else 0.0
    out.write(
        f"download    {human_size(d.download)} of {human_size(d.new_size)} ({share:.1%}) in {d.requests} requests "
        f"({d.download} bytes)\n"
    )
    return 0


def cmd_export_casync(args: argparse.Namespace) -> int:
    policy = _policy(args)
    with _open(args.bundle) as f:
        vp = open_verified(f, policy)
        p = vp.manifest.payload(args.payload)
        bar = _progress(args, "export", p.size)
        written = export_casync(f, vp.manifest, args.payload, args.index, args.store, progress=bar.update)
        bar.finish()
    print(f"exported {p.name!r}: index {args.index}, {p.chunks} chunks ({written} new) in {args.store}")
    return 0


def cmd_keys_create_dev(args: argparse.Namespace) -> int:
    pki = devkeys.make_dev_pki(args.type, args.name)
    paths = devkeys.write_dev_pki(pki, args.directory)
    print(
        f"development PKI ({args.type}) in {args.directory}: keyring.pem (device trust), "
        "signing.key + chain.pem (to sign bundles)"
    )
    for name in sorted(paths):
        print(f"  {paths[name]}")
    return 0
