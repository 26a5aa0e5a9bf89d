"""`pitstop daemon`: run the resident service (systemd starts it: daemon/data/pitstop.service)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pitstop.lazy import handler


def register(sub: Any) -> None:
    p = sub.add_parser("daemon", help="run the device daemon (D-Bus API, updates, health, inference loops)")
    p.add_argument("--config", type=Path, help="daemon configuration (default /etc/pitstop/pitstop.toml)")
    p.add_argument(
        "--system-config", type=Path, help="system configuration (default: $PITSTOP_CONFIG or /etc/pitstop/system.toml)"
    )
    p.add_argument("--bus-address", help="a D-Bus address instead of the configured bus (development, tests)")
    p.add_argument(
        "--check", action="store_true", help="check the configuration and its drop-ins, print nothing, exit (0 or 50)"
    )
    p.set_defaults(handler=handler("pitstop.daemon.cli", "cmd_daemon"))


def cmd_daemon(args: argparse.Namespace) -> int:
    if args.check:
        # As the daemon would read it at start (drop-ins, identity); `sshd -t` for pitstop. Image builds run it.
        from pitstop.daemon import config  # noqa: PLC0415
        from pitstop.ota import system_config  # noqa: PLC0415

        system = system_config.load(args.system_config) if args.system_config is not None else None
        config.load(args.config or config.DEFAULT_PATH, data_dir=system.data_dir if system else None)
        return 0
    import asyncio  # noqa: PLC0415 - asyncio and dbus-fast load only for the daemon, not every `pitstop`

    from pitstop.daemon import service  # noqa: PLC0415

    opts = service.Options(system_config=args.system_config, bus_address=args.bus_address)
    if args.config is not None:
        opts.config = args.config
    return asyncio.run(service.serve_forever(opts))
