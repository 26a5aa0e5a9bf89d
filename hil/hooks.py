"""The rig's hooks: shell commands a person configures for their bench (power, network, flashing, SD-mux),
run through pitstop's runner with a time limit."""

from __future__ import annotations

from pitstop.errors import CommandError
from pitstop.hil.errors import HilError
from pitstop.runner import run


def run_hook(what: str, command: str, *, timeout: float = 60.0, error: type[HilError] = HilError) -> str:
    """`sh -c command`; its standard output. `error` (with the hook's name and the command's stderr) when it
    cannot run, exits non-zero or runs past `timeout` s."""
    try:
        return run(["sh", "-c", command], timeout=timeout).text
    except CommandError as e:
        raise error(f"{what} hook `{command}` failed: {e.message}") from None
