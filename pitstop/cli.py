"""The `pitstop` command: one parser, each area registers its own subcommands."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from pitstop import __version__
from pitstop.daemon import cli as daemon_cli
from pitstop.daemon import device_cli
from pitstop.errors import InputError, PitstopError
from pitstop.image import cli as image_cli
from pitstop.inference import cli as inference_cli
from pitstop.ota import cli as ota_cli
from pitstop.ota.server import cli as server_cli

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, exit 2, like every other expected failure.
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pitstop", description="pitstop: A/B images, signed updates and inference for edge devices")
    parser.add_argument("--version", action="version", version=f"pitstop {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for commands run)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    sub = parser.add_subparsers(dest="area", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    ota_cli.register(sub)
    device_cli.register(sub)
    inference_cli.register(sub)
    image_cli.register(sub)
    daemon_cli.register(sub)
    server_cli.register(sub)
    return parser


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    elif verbose >= 2:
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose == 0 and not sys.stderr.isatty():
        # Off a terminal, progress is a handful of INFO lines: keep them.
        logging.getLogger("pitstop.progress").setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    handler: Handler = args.handler
    try:
        return handler(args)
    except PitstopError as e:
        sys.stderr.write(f"pitstop: error: {e.message}\n")
        return e.exit_code
    except BrokenPipeError:
        return 141  # stdout closed early (`pitstop bundle info | head`): not an error worth a message
    except OSError as e:
        # Disk full, permission denied, a read-only target: expected failures of the environment.
        where = f": {e.filename}" if e.filename else ""
        sys.stderr.write(f"pitstop: error: {e.strerror or e}{where}\n")
        return InputError.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("pitstop: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
