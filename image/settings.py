"""Declarative settings tables (mkosi style): one `Table` of `Setting`s per TOML table drives parsing,
validation, the JSON form and the reference docs of a configuration file. image/recipe.py holds the recipe's.

Each `Kind` reads one value from TOML or JSON (`parse`), writes it to JSON (`dump`) and describes it for the docs
(`describe`, `show`). A `Table` parses a TOML table into a frozen dataclass whose field names are its keys:
unknown keys are refused (with a "did you mean"), missing required keys named, defaults filled in, then the
table's own cross-key rules run. Every problem is a `RecipeError` naming the file and the dotted key
(`partitions.esp`, `user[2].ssh_keys[1]`; positions in arrays count from 1).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pitstop.image.errors import RecipeError
from pitstop.image.sizes import UNIT_NAMES, MiB, format_size, parse_size


@dataclass(frozen=True)
class Ctx:
    file: str  # what messages name: the recipe file, or "JSON"
    base: Path  # relative paths are relative to this directory

    def fail(self, key: str, problem: str) -> RecipeError:
        return RecipeError(f"{self.file}: {key}: {problem}")


def _toml(value: Any) -> str:
    """A value as it would be written in TOML (for docs and messages)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    return str(value)


_TYPE_NAMES = {bool: "true or false", int: "an integer", str: "a string", list: "an array", dict: "a table"}


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    for t, name in _TYPE_NAMES.items():
        if isinstance(value, t):
            return name.replace("true or false", "a boolean")
    return type(value).__name__


class Kind:
    """How one value is read (from TOML or JSON), written to JSON and described in the docs."""

    def describe(self) -> str:
        raise NotImplementedError

    def parse(self, value: object, ctx: Ctx, key: str) -> Any:
        raise NotImplementedError

    def dump(self, value: Any) -> Any:
        return value

    def show(self, value: Any) -> str:
        return f"`{_toml(value)}`"


def _need(value: object, t: type, ctx: Ctx, key: str, what: str) -> None:
    if not isinstance(value, t) or (t is int and isinstance(value, bool)):
        raise ctx.fail(key, f"must be {what}, not {_type_name(value)}")


@dataclass(frozen=True)
class Text(Kind):
    rule: str = ""  # the rule in words: docs and messages
    pattern: str | None = None  # must match in full
    allowed: tuple[str, ...] = ()
    check: Callable[[str], str | None] | None = None  # extra rule: None if fine, else the problem

    def describe(self) -> str:
        return "string"

    def parse(self, value: object, ctx: Ctx, key: str) -> str:
        _need(value, str, ctx, key, "a string")
        assert isinstance(value, str)
        if self.allowed and value not in self.allowed:
            raise ctx.fail(key, f"{value!r} is not allowed (allowed: {', '.join(map(repr, self.allowed))})")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise ctx.fail(key, f"{value!r} is not allowed: {self.rule}")
        if self.check is not None and (problem := self.check(value)) is not None:
            raise ctx.fail(key, problem)
        return value


@dataclass(frozen=True)
class Integer(Kind):
    min: int = 0
    max: int = 2**63 - 1

    def describe(self) -> str:
        return "integer"

    def parse(self, value: object, ctx: Ctx, key: str) -> int:
        _need(value, int, ctx, key, "an integer")
        assert isinstance(value, int)
        if not self.min <= value <= self.max:
            raise ctx.fail(key, f"{value} is out of range ({self.min} … {self.max})")
        return value


@dataclass(frozen=True)
class Flag(Kind):
    def describe(self) -> str:
        return "boolean"

    def parse(self, value: object, ctx: Ctx, key: str) -> bool:
        _need(value, bool, ctx, key, "true or false")
        assert isinstance(value, bool)
        return value


FILL = "fill"


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # a Setting's default when it has none


@dataclass(frozen=True)
class Size(Kind):
    """A size in bytes, a multiple of 1 MiB: an integer, or a string with a binary unit ("64MiB", "2G")."""

    min: int = MiB
    fill: bool = False  # the string "fill" is allowed (parsed as None)

    def describe(self) -> str:
        return "size" + (' or `"fill"`' if self.fill else "")

    def parse(self, value: object, ctx: Ctx, key: str) -> int | None:
        if self.fill and value == FILL:
            return None
        if isinstance(value, str):
            try:
                n = parse_size(value)
            except ValueError as e:
                raise ctx.fail(key, str(e)) from None
        elif isinstance(value, int) and not isinstance(value, bool):
            n = value
        else:
            fill = ' or "fill"' if self.fill else ""
            raise ctx.fail(
                key,
                f'must be a size such as "64MiB" (units {UNIT_NAMES}) or a number of bytes{fill}, '
                f"not {_type_name(value)}",
            )
        if n % MiB:
            raise ctx.fail(key, f"{value!r} is not a whole number of MiB (partitions are aligned to 1 MiB)")
        if n < self.min:
            raise ctx.fail(key, f"{value!r} is too small (at least {format_size(self.min)})")
        return n

    def dump(self, value: Any) -> Any:
        return FILL if value is None else value

    def show(self, value: Any) -> str:
        return f'`"{FILL}"`' if value is None else f'`"{format_size(value)}"`'


@dataclass(frozen=True)
class PathKind(Kind):
    """A path relative to the recipe file (or absolute) that must exist as a file or directory."""

    what: str = "file"  # "file", "directory" or "file or directory"
    special: tuple[str, ...] = ()  # words taken as they are instead of a path
    check: Callable[[Path], str | None] | None = None  # checks the content: None if fine, else the problem

    def describe(self) -> str:
        return f"path ({self.what})" + "".join(f' or `"{s}"`' for s in self.special)

    def parse(self, value: object, ctx: Ctx, key: str) -> Path | str:
        _need(value, str, ctx, key, f"a path to a {self.what} (a string)")
        assert isinstance(value, str)
        if value in self.special:
            return value
        if not value or "\0" in value:
            raise ctx.fail(key, "must be a path")
        path = Path(os.path.normpath(ctx.base / value))
        ok = {"file": path.is_file(), "directory": path.is_dir(), "file or directory": path.exists()}[self.what]
        if not ok:
            what = "does not exist" if not path.exists() else f"is not a {self.what}"
            raise ctx.fail(key, f"{value!r} ({path}) {what}")
        if self.check is not None and (problem := self.check(path)) is not None:
            raise ctx.fail(key, f"{value!r}: {problem}")
        return path

    def dump(self, value: Any) -> Any:
        return str(value)


@dataclass(frozen=True)
class ListOf(Kind):
    item: Kind
    unique: bool = True

    def describe(self) -> str:
        return f"array of {self.item.describe()}"

    def parse(self, value: object, ctx: Ctx, key: str) -> tuple[Any, ...]:
        _need(value, list, ctx, key, "an array")
        assert isinstance(value, list)
        out = tuple(self.item.parse(v, ctx, f"{key}[{i}]") for i, v in enumerate(value, start=1))
        if self.unique:
            seen: set[Any] = set()
            for i, v in enumerate(out, start=1):
                if v in seen:
                    raise ctx.fail(f"{key}[{i}]", f"{_toml(self.item.dump(v))} is listed twice")
                seen.add(v)
        return out

    def dump(self, value: Any) -> Any:
        return [self.item.dump(v) for v in value]


@dataclass(frozen=True)
class Setting:
    key: str
    kind: Kind
    doc: str
    default: Any = REQUIRED
    shown: str = ""  # the default as the docs show it, where the value alone would mislead


# A problem found by a table's cross-check: (key relative to the table, what is wrong).
Problems = list[tuple[str, str]]


@dataclass(frozen=True)
class Table:
    name: str  # TOML table name ("" for the top level)
    cls: type
    settings: tuple[Setting, ...]
    doc: str
    check: Callable[[Any], Problems] | None = None  # rules across keys, after `finish`
    finish: Callable[[Any], Any] | None = None  # defaults that depend on other keys

    def parse(self, raw: object, ctx: Ctx, key: str) -> Any:
        _need(raw, dict, ctx, key or "recipe", "a table")
        assert isinstance(raw, dict)
        known = [s.key for s in self.settings]
        for k in raw:
            if k not in known:
                close = difflib.get_close_matches(k, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                where = f"{key}: " if key else ""
                raise RecipeError(f"{ctx.file}: {where}unknown key {k!r}{hint}; allowed: {', '.join(known)}")
        values = {}
        for s in self.settings:
            sub = f"{key}.{s.key}" if key else s.key
            if s.key in raw:
                value = raw[s.key]
                # JSON writes an unset optional value as null; TOML has no null.
                values[s.key] = None if value is None and s.default is None else s.kind.parse(value, ctx, sub)
            elif isinstance(s.kind, (Section, Sections)):
                values[s.key] = s.kind.parse([] if isinstance(s.kind, Sections) else {}, ctx, sub)
            elif s.default is REQUIRED:
                raise ctx.fail(sub, f"is required ({s.kind.describe()}: {s.doc.split('. ')[0].rstrip('.')})")
            else:
                values[s.key] = s.default
        obj = self.cls(**values)
        if self.finish is not None:
            obj = self.finish(obj)
        if self.check is not None:
            for k, problem in self.check(obj):
                raise ctx.fail(f"{key}.{k}" if key else k, problem)
        return obj

    def dump(self, obj: Any) -> dict[str, Any]:
        return {
            s.key: None if getattr(obj, s.key) is None and s.default is None else s.kind.dump(getattr(obj, s.key))
            for s in self.settings
        }


@dataclass(frozen=True)
class Section(Kind):
    table: Table

    def describe(self) -> str:
        return "table"

    def parse(self, value: object, ctx: Ctx, key: str) -> Any:
        return self.table.parse(value, ctx, key)

    def dump(self, value: Any) -> Any:
        return self.table.dump(value)


@dataclass(frozen=True)
class Sections(Kind):
    table: Table

    def describe(self) -> str:
        return "array of tables"

    def parse(self, value: object, ctx: Ctx, key: str) -> tuple[Any, ...]:
        _need(value, list, ctx, key, "an array of tables")
        assert isinstance(value, list)
        return tuple(self.table.parse(v, ctx, f"{key}[{i}]") for i, v in enumerate(value, start=1))

    def dump(self, value: Any) -> Any:
        return [self.table.dump(v) for v in value]


# --- docs -------------------------------------------------------------------------------------------------


def _default_text(s: Setting) -> str:
    if s.shown:
        return s.shown
    if s.default is REQUIRED:
        return "— (required)"
    if s.default is None:
        return "— (unset)"
    if isinstance(s.kind, (Sections, ListOf)) and not s.default:
        return "`[]`"
    return s.kind.show(s.default)


def _rule_text(s: Setting) -> str:
    k = s.kind
    if isinstance(k, ListOf):
        k = k.item
    if isinstance(k, Text):
        if k.allowed:
            return "one of " + ", ".join(f"`{a}`" for a in k.allowed)
        return k.rule
    if isinstance(k, Integer):
        return f"{k.min} … {k.max}" if k.max < 2**63 - 1 else f"≥ {k.min}"
    if isinstance(k, Size):
        return f"multiple of 1 MiB, at least {format_size(k.min)}"
    return ""


def tables(table: Table, prefix: str = "") -> list[tuple[str, Table, bool]]:
    out = []
    for s in table.settings:
        if isinstance(s.kind, (Section, Sections)):
            name = f"{prefix}{s.key}"
            out.append((name, s.kind.table, isinstance(s.kind, Sections)))
            out += tables(s.kind.table, f"{name}.")
    return out


def table_markdown(table: Table) -> list[str]:
    lines = ["| key | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    for s in table.settings:
        if isinstance(s.kind, (Section, Sections)):
            continue
        rule = _rule_text(s).replace("|", "\\|")
        lines.append(f"| `{s.key}` | {s.kind.describe()} | {_default_text(s)} | {rule} | {s.doc} |")
    return lines
