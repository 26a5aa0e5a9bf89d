"""Subcommand handlers imported only when their subcommand runs, so that `pitstop` starts in a fraction of the
time: `pitstop mark-good` runs at every boot and must not load the bundle, image or inference code."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]


def handler(module: str, name: str) -> Handler:
    def run(args: argparse.Namespace) -> int:
        fn: Handler = getattr(importlib.import_module(module), name)
        return fn(args)

    run.__qualname__ = run.__name__ = name
    return run
