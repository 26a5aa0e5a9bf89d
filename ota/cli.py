"""`pitstop bundle …` and `pitstop keys …`: the arguments. The commands are in bundle_commands.py, imported only
when one runs, so that `pitstop mark-good` at every boot does not load the bundle and X.509 code."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pitstop.lazy import handler
from pitstop.ota.clock import RELEASE_TIME_FLOOR, ClockPolicy

_COMMANDS = "pitstop.ota.bundle_commands"


def register(sub: Any) -> None:
    _register_bundle(sub.add_parser("bundle", help="create, sign, verify, inspect and extract update bundles"))
    _register_keys(sub.add_parser("keys", help="development keys and certificates"))


# --- argument helpers ----------------------------------------------------------------------------------


def _add_signer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key", type=Path, help="PEM private key of the signing certificate")
    p.add_argument(
        "--sign-command",
        help="external signer: gets the digest (ECDSA) or manifest (Ed25519) on stdin, prints the signature",
    )
    p.add_argument(
        "--cert",
        type=Path,
        action="append",
        default=[],
        help="signing certificate, then intermediates (PEM; repeatable)",
    )


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keyring", type=Path, required=True, help="trusted root certificate(s): PEM file or directory")
    p.add_argument("--compatible", help="refuse bundles not made for this compatible string")
    p.add_argument("--min-security-version", type=int, help="refuse bundles below this security_version")
    p.add_argument(
        "--clock",
        choices=[c.value for c in ClockPolicy],
        default=ClockPolicy.FLOOR.value,
        help="certificate time policy (docs/bundle-format.md); default: floor",
    )
    p.add_argument(
        "--time-floor",
        help="earliest time this device can be at (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ); "
        f"default {RELEASE_TIME_FLOOR:%Y-%m-%d}, this release's date",
    )


# --- bundle ------------------------------------------------------------------------------------------


def _register_bundle(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=type(parser))
    sub.required = True

    p = sub.add_parser("create", help="build a bundle from a spec file or flags")
    p.add_argument("spec", nargs="?", type=Path, help="bundle spec (TOML); or use the flags below")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--version", dest="bundle_version")
    p.add_argument("--security-version", type=int)
    p.add_argument("--compatible")
    p.add_argument("--description", default="")
    p.add_argument(
        "--payload",
        action="append",
        default=[],
        metavar="TYPE:NAME:SOURCE[:TARGET]",
        help="rootfs, model or files payload (repeatable)",
    )
    p.add_argument("--chunk-size", metavar="MIN:AVG:MAX", help="content-defined chunk sizes in bytes")
    p.add_argument("--zstd-level", type=int, help="1..19 (default 3)")
    _add_signer_args(p)
    p.set_defaults(handler=handler(_COMMANDS, "cmd_create"))

    p = sub.add_parser("sign", help="sign (or re-sign) a bundle")
    p.add_argument("bundle", type=Path)
    p.add_argument("-o", "--output", type=Path, help="default: sign in place")
    _add_signer_args(p)
    p.set_defaults(handler=handler(_COMMANDS, "cmd_sign"))

    p = sub.add_parser("verify", help="check signature, chain, policy and every chunk")
    p.add_argument("bundle", type=Path)
    _add_policy_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=handler(_COMMANDS, "cmd_verify"))

    p = sub.add_parser("info", help="show versions, payloads and signer (verifies nothing)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=handler(_COMMANDS, "cmd_info"))

    p = sub.add_parser("extract", help="extract one payload, verified on the way")
    p.add_argument("bundle", type=Path)
    p.add_argument("payload", help="payload name")
    p.add_argument("-o", "--output", type=Path, required=True, help="file (rootfs) or new directory (model, files)")
    _add_policy_args(p)
    p.set_defaults(handler=handler(_COMMANDS, "cmd_extract"))

    p = sub.add_parser("diff", help="what a device running OLD downloads to install NEW (delta over HTTP)")
    p.add_argument("old", type=Path, help="the bundle the device runs")
    p.add_argument("new", type=Path, help="the bundle it is to install")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=handler(_COMMANDS, "cmd_diff"))

    p = sub.add_parser("export-casync", help="write a payload's index as .caibx plus a casync chunk store")
    p.add_argument("bundle", type=Path)
    p.add_argument("payload", help="payload name")
    p.add_argument("--index", type=Path, required=True, help="output .caibx file")
    p.add_argument("--store", type=Path, required=True, help="chunk store directory (created if missing)")
    _add_policy_args(p)
    p.set_defaults(handler=handler(_COMMANDS, "cmd_export_casync"))


# --- keys --------------------------------------------------------------------------------------------


def _register_keys(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=type(parser))
    sub.required = True
    p = sub.add_parser("create-dev", help="a development root CA, intermediate and signing certificate")
    p.add_argument("directory", type=Path)
    p.add_argument("--type", default="ecdsa-p256", help="ecdsa-p256 (default) or ed25519")
    p.add_argument("--name", default="pitstop dev", help="common-name prefix")
    p.set_defaults(handler=handler(_COMMANDS, "cmd_keys_create_dev"))
