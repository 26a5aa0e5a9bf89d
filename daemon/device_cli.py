"""`pitstop install`, `pitstop status`, `pitstop mark-good`, `pitstop mark-bad`: the device's update commands.

When the pitstop daemon runs, they are clients of its D-Bus API (daemon/client.py): the daemon owns the update
flow (reboot policy, health gate), so an install goes through it rather than around it. Without a daemon, with
`--local` or with `--config`, they act on the device directly (ota/device.py, ota/installer.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pitstop.errors import PitstopError, UsageError
from pitstop.ota import system_config
from pitstop.ota.device import Device, DeviceStatus
from pitstop.progress import Progress, human_size

if TYPE_CHECKING:
    from pitstop.daemon.client import DaemonClient, DaemonState
    from pitstop.ota.installer import InstallProgress

log = logging.getLogger(__name__)

DEFAULT_RETRIES = 8
DEFAULT_TIMEOUT_S = 30.0
# Directories the daemon's sandbox hides from it (PrivateTmp=, ProtectHome= in pitstop.service).
_HIDDEN_FROM_DAEMON = ("/tmp/", "/var/tmp/", "/home/", "/root/", "/run/user/")  # noqa: S108


def register(sub: Any) -> None:
    p = sub.add_parser("install", help="install a bundle (path or http(s) URL) into the inactive slot")
    p.add_argument("source", help="bundle file or http(s):// URL")
    _add_common_args(p)
    p.add_argument(
        "--no-activate", action="store_true", help="write and record, but leave the boot order as is (--local only)"
    )
    p.add_argument(
        "--no-delta",
        action="store_true",
        help="over HTTP(S), download the whole bundle instead of only the rootfs chunks the booted slot lacks "
        "(docs/delta.md; --local only)",
    )
    p.add_argument(
        "--ca", type=Path, help="CA bundle for HTTPS (default: certifi's bundle, or $REQUESTS_CA_BUNDLE; --local only)"
    )
    p.add_argument("--client-cert", type=Path, help="client certificate (PEM) for mutual TLS (--local only)")
    p.add_argument("--client-key", type=Path, help="client key (PEM), if not inside --client-cert (--local only)")
    p.add_argument(
        "--header", action="append", default=[], metavar="NAME:VALUE", help="extra HTTP header (--local only)"
    )
    p.add_argument(
        "--rate-limit", type=_rate, metavar="BYTES[k|M]", help="download bandwidth limit per second (--local only)"
    )
    p.add_argument(
        "--retries",
        type=int,
        help=f"consecutive failed attempts before giving up (default {DEFAULT_RETRIES}; --local only)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        help=f"seconds without data before a retry (default {DEFAULT_TIMEOUT_S:.0f}; --local only)",
    )
    p.set_defaults(handler=cmd_install)

    p = sub.add_parser(
        "status",
        help="slots, boot order, tries and pending commit (and the daemon's update state and loops when it runs)",
    )
    _add_common_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("mark-good", help="commit the booted slot (and a pending install) after health checks")
    _add_common_args(p)
    p.set_defaults(handler=cmd_mark_good)

    p = sub.add_parser(
        "mark-bad", help="never boot a slot again (default: the booted one), or drop a pending model/files install"
    )
    p.add_argument("slot", nargs="?")
    _add_common_args(p)
    p.set_defaults(handler=cmd_mark_bad)


def _add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        help=f"system configuration (default: $PITSTOP_CONFIG or "
        f"{system_config.DEFAULT_PATH}); acts locally, as --local does",
    )
    p.add_argument(
        "--local",
        action="store_true",
        help="act on the device directly, not through the pitstop daemon (the default when no daemon runs)",
    )


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


def _daemon(args: argparse.Namespace) -> DaemonClient | None:
    """The running daemon's client, or None to act locally (--local, --config, or no daemon on the bus)."""
    if args.local or args.config is not None:
        return None
    from pitstop.daemon import client  # noqa: PLC0415 - not for the other commands, nor with --local

    return client.connect()


def _local_status() -> DeviceStatus | None:
    """The device's status read from its state files (read-only, so safe beside the daemon), or None when this
    user cannot read them: the daemon's files are not world-readable."""
    try:
        return Device(system_config.load()).status()
    except (PitstopError, OSError) as e:
        log.info("state files not read: %s", e.message if isinstance(e, PitstopError) else e)
        return None


# -- install -------------------------------------------------------------------------------------------------


def cmd_install(args: argparse.Namespace) -> int:
    try:
        headers = _headers(args.header)
    except argparse.ArgumentTypeError as e:
        raise UsageError(str(e)) from None
    daemon = _daemon(args)
    if daemon is not None:
        with daemon:
            return _install_through(daemon, args)

    # Only `install` needs HTTP (requests) and the installer: `mark-good`, run at every boot, starts faster.
    from pitstop.ota.http_source import HttpOptions  # noqa: PLC0415
    from pitstop.ota.installer import Installer  # noqa: PLC0415

    cfg = system_config.load(args.config)
    retries = DEFAULT_RETRIES if args.retries is None else args.retries
    timeout = DEFAULT_TIMEOUT_S if args.timeout is None else args.timeout
    http = HttpOptions(
        ca=args.ca,
        client_cert=args.client_cert,
        client_key=args.client_key,
        headers=headers,
        read_timeout=timeout,
        retries=retries,
        rate_limit=args.rate_limit,
    )
    bar: Progress | None = None

    def progress(ev: InstallProgress) -> None:
        nonlocal bar
        if ev.phase != "write":
            return
        if bar is None:
            bar = Progress("installing", ev.total, enabled=not args.quiet)
        bar.update(ev.done - bar.done)

    installer = Installer(cfg, http=http, progress=progress, delta=not args.no_delta)
    result = installer.install(args.source, activate=not args.no_activate)
    if bar is not None:
        bar.finish()
    m = result.manifest
    where = f"slot {result.slot}" if result.slot else "the data partition"
    then = (
        "reboot to start it; `pitstop mark-good` after it proves healthy"
        if result.activated
        else "not activated"
        if result.slot
        else "`pitstop mark-good` to commit, `pitstop mark-bad` to go back"
    )
    print(f"installed {m.version} (security_version {m.security_version}) into {where}: {then}")
    return 0


def _install_through(daemon: DaemonClient, args: argparse.Namespace) -> int:
    """Hand the install to the daemon and follow it: a bar from its Progress signals, its message at the end."""
    local_only = [
        flag
        for flag, given in (
            ("--no-activate", args.no_activate),
            ("--no-delta", args.no_delta),
            ("--ca", args.ca is not None),
            ("--client-cert", args.client_cert is not None),
            ("--client-key", args.client_key is not None),
            ("--header", bool(args.header)),
            ("--rate-limit", args.rate_limit is not None),
            ("--retries", args.retries is not None),
            ("--timeout", args.timeout is not None),
        )
        if given
    ]
    if local_only:
        raise UsageError(
            f"{', '.join(local_only)}: not possible through the pitstop daemon (its Install takes only "
            "the source; it uses its own HTTP settings); add --local to install without it"
        )
    # A path as the daemon sees it: absolute (its working directory is not ours). Same test as http_source.is_url,
    # without loading the HTTP stack.
    source = args.source if args.source.startswith(("http://", "https://")) else os.path.abspath(args.source)
    bar: Progress | None = None

    def progress(stage: str, done: int, total: int) -> None:
        nonlocal bar
        if stage != "write":
            return
        if bar is None:
            bar = Progress("installing", total, enabled=not args.quiet)
        if total and bar.total != total:
            bar.total = total
        bar.update(done - bar.done)

    from pitstop.daemon.errors import InstallFailedError  # noqa: PLC0415

    try:
        message = daemon.install(source, progress=progress)
    except KeyboardInterrupt:
        _end_bar_line(bar, args.quiet)
        sys.stderr.write("pitstop: interrupted: the install goes on in the daemon (`pitstop status` shows it)\n")
        return 130
    except InstallFailedError as e:
        _end_bar_line(bar, args.quiet)
        if e.message.startswith("cannot open bundle") and source.startswith(_HIDDEN_FROM_DAEMON):
            e.message += (
                "; the daemon's sandbox hides /tmp, /var/tmp and home directories from it: put the bundle "
                "elsewhere (e.g. under /data), or use --local"
            )
        raise
    if bar is not None:
        bar.finish()
    print(message)
    return 0


def _end_bar_line(bar: Progress | None, quiet: bool) -> None:
    if bar is not None and not quiet and sys.stderr.isatty():
        sys.stderr.write("\n")  # the bar's line stays; the message goes below it


# -- status --------------------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    daemon = _daemon(args)
    if daemon is None:
        _print_status(Device(system_config.load(args.config)).status().to_json(), args.json)
        return 0
    with daemon:
        state = daemon.state()
    _print_status(status_json(state, _local_status()), args.json)
    return 0


def status_json(d: DaemonState, local: DeviceStatus | None) -> dict[str, Any]:
    """The status document of DeviceStatus.to_json, made from the daemon's properties (booted, primary, phase
    and per slot booted, primary, bootable, pending commit, tries left), the rest read from the state files
    (`local`; None when they cannot be read: those fields are then null); plus a `daemon` object."""
    loc = local.to_json() if local is not None else None
    by_name: dict[str, dict[str, Any]] = {s["name"]: s for s in loc["slots"]} if loc else {}
    slots = []
    for r in d.slots:
        mine = by_name.get(r.name)
        slots.append(
            {
                "name": r.name,
                "booted": r.booted,
                "primary": r.primary,
                "next_boot": mine["next_boot"] if mine else None,
                "bootable": r.bootable,
                "tries_left": r.tries_left,
                "content": mine["content"] if mine else None,
                "pending_commit": r.pending_commit,
                "bundle": mine["bundle"] if mine else ({"version": r.version} if r.version else {}),
            }
        )
    return {
        "booted": d.booted or None,
        "primary": d.primary or None,
        "next_boot": loc["next_boot"] if loc else None,
        "pending": next((r.name for r in d.slots if r.pending_commit), None),
        "phase": d.phase,
        "committed_security_version": loc["committed_security_version"] if loc else None,
        "slots": slots,
        "payloads": loc["payloads"] if loc else None,
        "pending_payloads": loc["pending_payloads"] if loc else None,
        "time_floor": loc["time_floor"] if loc else None,
        "daemon": {
            "version": d.version,
            "state_files_read": loc is not None,
            "update_state": d.update_state,
            "update_progress": {"stage": d.progress_stage, "done": d.progress_done, "total": d.progress_total},
            "update_error": d.update_error,
            "loops": [
                {
                    "name": lp.name,
                    "state": lp.state,
                    "fps": lp.fps,
                    "p50_ms": lp.p50_ms,
                    "p99_ms": lp.p99_ms,
                    "restarts": lp.restarts,
                    "cause": lp.cause,
                }
                for lp in d.loops
            ],
        },
    }


def _print_status(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        json.dump(doc, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return
    daemon = doc.get("daemon")
    known = daemon is None or daemon["state_files_read"]
    nxt = doc["next_boot"] or ("-" if known else "?")
    print(f"booted: {doc['booted'] or 'unknown'}   next boot: {nxt}   phase: {doc['phase']}")
    sv = doc["committed_security_version"]
    print(f"committed security_version: {'?' if sv is None else sv}")
    for v in doc["slots"]:
        flags = [
            f for f, on in (("booted", v["booted"]), ("primary", v["primary"]), ("pending", v["pending_commit"])) if on
        ]
        version = v["bundle"].get("version", "-")
        print(
            f"  slot {v['name']}: {v['content'] or '?':<9} version {version:<12} tries {v['tries_left']}  "
            f"{'bootable' if v['bootable'] else 'not bootable'}  {' '.join(flags)}".rstrip()
        )
    for target, ver in sorted((doc["payloads"] or {}).items()):
        print(
            f"  {target}: current {ver['current'] or '-'}  previous {ver['previous'] or '-'}  "
            f"pending {ver['pending'] or '-'}"
        )
    if daemon is None:
        return
    if not known:
        print(
            "  (content, next boot, security version and model/files versions: the state files are not "
            "readable by this user)"
        )
    state, p = daemon["update_state"], daemon["update_progress"]
    line = f"daemon: pitstop {daemon['version']}, update {state}"
    if state == "installing" and p["total"]:
        line += f": {p['stage']} {p['done'] * 100 // p['total']}% ({human_size(p['done'])} of {human_size(p['total'])})"
    elif daemon["update_error"] and state == "failed":
        line += f": {daemon['update_error']}"
    print(line)
    for lp in daemon["loops"]:
        print(
            f"  loop {lp['name']:<16} {lp['state']:<10} {lp['fps']:7.1f} fps  p50 {lp['p50_ms']:7.1f} ms  "
            f"p99 {lp['p99_ms']:7.1f} ms  restarts {lp['restarts']}  {lp['cause']}".rstrip()
        )


# -- mark-good, mark-bad -------------------------------------------------------------------------------------


def cmd_mark_good(args: argparse.Namespace) -> int:
    daemon = _daemon(args)
    if daemon is None:
        st = Device(system_config.load(args.config)).mark_good()
        print(f"slot {st.slots.booted} marked good; committed security_version {st.slots.committed_security_version}")
        return 0
    with daemon:
        slot = daemon.mark_good()
    local = _local_status()
    sv = f"; committed security_version {local.slots.committed_security_version}" if local else ""
    print(f"slot {slot} marked good{sv}")
    return 0


def cmd_mark_bad(args: argparse.Namespace) -> int:
    daemon = _daemon(args)
    if daemon is None:
        st = Device(system_config.load(args.config)).mark_bad(args.slot)
        print(f"marked bad; next boot: slot {st.slots.next_boot}")
        return 0
    with daemon:
        daemon.mark_bad(args.slot)
    local = _local_status()
    print(f"marked bad; next boot: slot {local.slots.next_boot}" if local else "marked bad")
    return 0
