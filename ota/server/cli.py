"""`pitstop server …`: the arguments. The commands are in commands.py, imported only when one runs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from pitstop.lazy import handler

_COMMANDS = "pitstop.ota.server.commands"
DATA_ENV = "PITSTOP_SERVER_DATA"


def _data(p: argparse.ArgumentParser) -> None:
    default = os.environ.get(DATA_ENV)
    p.add_argument(
        "--data",
        type=Path,
        default=Path(default) if default else None,
        required=default is None,
        help=f"the server's data directory (default ${DATA_ENV})",
    )


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def register(sub: Any) -> None:
    parser = sub.add_parser("server", help="the site/dev update server: hawkBit DDI, OTLP ingest, rollouts")
    cmds = parser.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=type(parser))
    cmds.required = True

    p = cmds.add_parser("serve", help="serve devices (DDI and OTLP) until SIGTERM")
    _data(p)
    p.add_argument("--listen", default="0.0.0.0:8080", metavar="HOST:PORT", help="default 0.0.0.0:8080")
    p.add_argument("--tls-cert", type=Path, help="server certificate (PEM, with its chain)")
    p.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    p.add_argument("--client-ca", type=Path, help="require client certificates issued under this CA (mutual TLS)")
    p.add_argument("--auto-register", action="store_true", help="register unknown devices on their first poll")
    p.add_argument("--keyring", type=Path, help="verify uploads against these root certificates (kept in --data)")
    p.add_argument("--tenant", default="DEFAULT", help="the DDI tenant in device URLs (default DEFAULT)")
    p.add_argument(
        "--poll-interval",
        default="00:05:00",
        metavar="TIME",
        help="how long devices sleep between polls: 30s, 5m, HH:MM:SS (default 00:05:00)",
    )
    p.add_argument(
        "--public-url",
        help="base URL of links given to devices, when they reach the server through "
        "a proxy (default: from the request)",
    )
    p.add_argument(
        "--health-history",
        type=int,
        default=240,
        metavar="N",
        help="health summaries kept per device (default 240: 2 hours at 30 s)",
    )
    p.set_defaults(handler=handler(_COMMANDS, "cmd_serve"))

    _register_device(cmds.add_parser("device", help="register, list, show and remove devices"))

    p = cmds.add_parser("gateway-token", help="set or disable the tenant's gateway token (prints a new one)")
    _data(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--token", help="use this token instead of a random one")
    g.add_argument("--disable", action="store_true", help="refuse gateway tokens from now on")
    p.set_defaults(handler=handler(_COMMANDS, "cmd_gateway_token"))

    p = cmds.add_parser("upload", help="check a bundle and store it for deployments")
    _data(p)
    p.add_argument("bundle", type=Path)
    p.add_argument("--keyring", type=Path, help="root certificates to verify it against (default: the server's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=handler(_COMMANDS, "cmd_upload"))

    p = cmds.add_parser("bundles", help="list the uploaded bundles")
    _data(p)
    _json(p)
    p.set_defaults(handler=handler(_COMMANDS, "cmd_bundles"))

    p = cmds.add_parser("deploy", help="deploy a bundle to devices, a group or part of the fleet, in waves")
    _data(p)
    p.add_argument(
        "bundle", metavar="BUNDLE", help="a bundle file (uploaded first), or an uploaded bundle's id or version"
    )
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", action="append", metavar="ID", help="this device (repeatable)")
    who.add_argument("--group", help="the devices of this group")
    who.add_argument("--all", action="store_true", help="every registered device")
    p.add_argument("--percent", type=float, metavar="P", help="only P %% of those devices, picked at random")
    p.add_argument(
        "--waves",
        default="100",
        metavar="P1,P2,…",
        help="cumulative percentages of the targets per wave, ending at 100 (default: one wave)",
    )
    p.add_argument("--first-wave", type=int, metavar="N", help="a first wave of N devices before --waves")
    p.add_argument(
        "--max-failure",
        default="1",
        metavar="F",
        help="stop when more than this share of a wave's finished devices failed: 0.2 or 20%% (default 1: never)",
    )
    p.add_argument(
        "--advance-at",
        default="1",
        metavar="F",
        help="start the next wave when this share of the wave has finished (default 1: all)",
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument("--soft", action="store_true", help="a soft update: the device may postpone it")
    how.add_argument("--download-only", action="store_true", help="download, do not install")
    p.add_argument("--maintenance-window", metavar="HH:MM-HH:MM[@ZONE]", help="install only inside this daily window")
    p.add_argument("--reinstall", action="store_true", help="also devices that run this bundle already")
    p.add_argument("--keyring", type=Path, help="for a bundle file: as for upload")
    _json(p)
    p.set_defaults(handler=handler(_COMMANDS, "cmd_deploy"))

    p = cmds.add_parser("rollouts", help="list rollouts, or show one")
    _data(p)
    p.add_argument("rollout", nargs="?", metavar="ROLLOUT", help="r3: its waves and devices")
    _json(p)
    p.set_defaults(handler=handler(_COMMANDS, "cmd_rollouts"))

    p = cmds.add_parser("cancel", help="cancel a rollout (r3) or one action (17)")
    _data(p)
    p.add_argument("target", metavar="ROLLOUT-or-ACTION")
    p.add_argument("--force", action="store_true", help="end it now, without waiting for the devices to confirm")
    p.set_defaults(handler=handler(_COMMANDS, "cmd_cancel"))

    p = cmds.add_parser("resume", help="go on with a rollout stopped by its failure threshold")
    _data(p)
    p.add_argument("rollout", metavar="ROLLOUT")
    p.set_defaults(handler=handler(_COMMANDS, "cmd_resume"))

    p = cmds.add_parser("check", help="check the database and the stored bundles")
    _data(p)
    p.add_argument("--deep", action="store_true", help="also hash every stored bundle")
    p.set_defaults(handler=handler(_COMMANDS, "cmd_check"))


def _register_device(parser: argparse.ArgumentParser) -> None:
    cmds = parser.add_subparsers(dest="device_cmd", metavar="COMMAND", parser_class=type(parser))
    cmds.required = True

    p = cmds.add_parser("add", help="register a device; prints its token")
    _data(p)
    p.add_argument("id")
    p.add_argument("--group")
    p.add_argument("--token", help="use this token instead of a random one")
    p.add_argument(
        "--no-token",
        action="store_true",
        help="no token: the device authenticates with a gateway token or a client certificate",
    )
    p.set_defaults(handler=handler(_COMMANDS, "cmd_device_add"))

    p = cmds.add_parser("list", help="devices with version, slot, last seen, health and deployment")
    _data(p)
    p.add_argument("--group")
    _json(p)
    p.set_defaults(handler=handler(_COMMANDS, "cmd_device_list"))

    p = cmds.add_parser("show", help="one device: attributes, health, actions and their history")
    _data(p)
    p.add_argument("id")
    _json(p)
    p.set_defaults(handler=handler(_COMMANDS, "cmd_device_show"))

    p = cmds.add_parser("token", help="give a device a new token; prints it")
    _data(p)
    p.add_argument("id")
    p.add_argument("--token", help="use this token instead of a random one")
    p.set_defaults(handler=handler(_COMMANDS, "cmd_device_token"))

    p = cmds.add_parser("group", help="move a device to another group (- for none)")
    _data(p)
    p.add_argument("id")
    p.add_argument("group")
    p.set_defaults(handler=handler(_COMMANDS, "cmd_device_group"))

    p = cmds.add_parser("remove", help="forget a device, its actions and its health")
    _data(p)
    p.add_argument("id")
    p.set_defaults(handler=handler(_COMMANDS, "cmd_device_remove"))
