"""`pitstop install`, `pitstop status`, `pitstop mark-good`, `pitstop mark-bad`: the device's update commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pitstop.errors import UsageError
from pitstop.ota import system_config
from pitstop.ota.device import Device, DeviceStatus

if TYPE_CHECKING:
    from pitstop.ota.installer import InstallProgress
from pitstop.progress import Progress


def register(sub: Any) -> None:
    p = sub.add_parser("install", help="install a bundle (path or http(s) URL) into the inactive slot")
    p.add_argument("source", help="bundle file or http(s):// URL")
    _add_config_arg(p)
    p.add_argument("--no-activate", action="store_true", help="write and record, but leave the boot order as is")
    p.add_argument("--ca", type=Path, help="CA bundle for HTTPS (default: certifi's bundle, or $REQUESTS_CA_BUNDLE)")
    p.add_argument("--client-cert", type=Path, help="client certificate (PEM) for mutual TLS")
    p.add_argument("--client-key", type=Path, help="client key (PEM), if not inside --client-cert")
    p.add_argument("--header", action="append", default=[], metavar="NAME:VALUE", help="extra HTTP header")
    p.add_argument("--rate-limit", type=_rate, metavar="BYTES[k|M]", help="download bandwidth limit per second")
    p.add_argument("--retries", type=int, default=8, help="consecutive failed attempts before giving up")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds without data before a retry")
    p.set_defaults(handler=cmd_install)

    p = sub.add_parser("status", help="slots, boot order, tries and pending commit")
    _add_config_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("mark-good", help="commit the booted slot (and a pending install) after health checks")
    _add_config_arg(p)
    p.set_defaults(handler=cmd_mark_good)

    p = sub.add_parser("mark-bad", help="never boot a slot again (default: the booted one), or drop a pending "
                       "model/files install")
    p.add_argument("slot", nargs="?")
    _add_config_arg(p)
    p.set_defaults(handler=cmd_mark_bad)


def _add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help=f"system configuration (default: $PITSTOP_CONFIG or "
                   f"{system_config.DEFAULT_PATH})")


def _rate(value: str) -> int:
    mult = {"k": 1 << 10, "K": 1 << 10, "M": 1 << 20}.get(value[-1:], 1)
    digits = value[:-1] if mult != 1 else value
    if not digits.isdigit() or int(digits) == 0:
        raise argparse.ArgumentTypeError(f"{value!r}: a positive number of bytes, optionally with k or M")
    return int(digits) * mult


def _headers(values: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for v in values:
        name, sep, val = v.partition(":")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"--header {v!r}: use NAME:VALUE")
        out.append((name.strip(), val.strip()))
    return tuple(out)


def cmd_install(args: argparse.Namespace) -> int:
    # Only `install` needs HTTP (requests) and the installer: `mark-good`, run at every boot, starts faster.
    from pitstop.ota.http_source import HttpOptions  # noqa: PLC0415
    from pitstop.ota.installer import Installer  # noqa: PLC0415

    try:
        headers = _headers(args.header)
    except argparse.ArgumentTypeError as e:
        raise UsageError(str(e)) from None
    cfg = system_config.load(args.config)
    http = HttpOptions(ca=args.ca, client_cert=args.client_cert, client_key=args.client_key, headers=headers,
                       read_timeout=args.timeout, retries=args.retries, rate_limit=args.rate_limit)
    bar: Progress | None = None

    def progress(ev: InstallProgress) -> None:
        nonlocal bar
        if ev.phase != "write":
            return
        if bar is None:
            bar = Progress("installing", ev.total, enabled=not args.quiet)
        bar.update(ev.done - bar.done)

    result = Installer(cfg, http=http, progress=progress).install(args.source, activate=not args.no_activate)
    if bar is not None:
        bar.finish()
    m = result.manifest
    where = f"slot {result.slot}" if result.slot else "the data partition"
    then = ("reboot to start it; `pitstop mark-good` after it proves healthy" if result.activated
            else "not activated" if result.slot else "`pitstop mark-good` to commit, `pitstop mark-bad` to go back")
    print(f"installed {m.version} (security_version {m.security_version}) into {where}: {then}")
    return 0


def _print_status(st: DeviceStatus, as_json: bool) -> None:
    if as_json:
        json.dump(st.to_json(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return
    s = st.slots
    print(f"booted: {s.booted or 'unknown'}   next boot: {s.next_boot or '-'}   phase: {s.phase.value}")
    print(f"committed security_version: {s.committed_security_version}")
    for v in s.slots:
        flags = [f for f, on in (("booted", v.booted), ("primary", v.primary), ("pending", v.pending_commit)) if on]
        version = v.bundle.get("version", "-")
        print(f"  slot {v.name}: {v.content.value:<9} version {version:<12} tries {v.tries_left}  "
              f"{'bootable' if v.bootable else 'not bootable'}  {' '.join(flags)}".rstrip())
    for target, ver in sorted(st.payloads.items()):
        print(f"  {target}: current {ver.current or '-'}  previous {ver.previous or '-'}  pending {ver.pending or '-'}")


def cmd_status(args: argparse.Namespace) -> int:
    _print_status(Device(system_config.load(args.config)).status(), args.json)
    return 0


def cmd_mark_good(args: argparse.Namespace) -> int:
    st = Device(system_config.load(args.config)).mark_good()
    print(f"slot {st.slots.booted} marked good; committed security_version {st.slots.committed_security_version}")
    return 0


def cmd_mark_bad(args: argparse.Namespace) -> int:
    st = Device(system_config.load(args.config)).mark_bad(args.slot)
    print(f"marked bad; next boot: slot {st.slots.next_boot}")
    return 0

