"""The daemon's configuration: /etc/pitstop/pitstop.toml plus drop-ins, as frozen dataclasses (docs/daemon-config.md).

The dataclasses below are the contract the rest of the daemon codes against. One declarative table per TOML table
(`TOP`, `HEALTH`, `UPDATE`, `LOOP`: `Setting`s of `Kind`s) drives parsing and validation, the JSON form (`as_dict`,
`from_dict`, which round-trip), what a reload may apply (`reload_diff`) and the reference in docs/daemon-config.md
(`render_docs`). Every error is one DaemonConfigError naming the file (the main file or the drop-in that set the
value), the dotted key (`update.reboot`, `loop[text-det].cpu_max`) and what is allowed.

Per-device settings (device id, update server URL and token, client certificate) are not in these files: factory
provisioning writes them to `<data_dir>/identity/` (image/provision.py) and `load` takes them as defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import time as Time
from pathlib import Path
from typing import Any

from pitstop import docgen
from pitstop.daemon.errors import DaemonConfigError
from pitstop.inference.choices import BACKENDS, PRECISIONS, PROVIDERS
from pitstop.ota import system_config

DEFAULT_PATH = Path("/etc/pitstop/pitstop.toml")
DEFAULT_DATA_DIR = Path("/data")
IDENTITY_DIR = "identity"  # under data_dir (image/datafs.py IDENTITY_DIR)
MAX_FILE = 1 << 20  # a configuration file larger than this is a mistake, not a configuration
MIN_POLL_S = 30.0  # never poll the update server more often, whatever the server or the file says


@dataclass(frozen=True)
class LoopConfig:
    """One supervised inference loop ([[loop]] tables)."""

    name: str
    model: Path
    source: str = "synthetic:"
    sink: str = "-"
    source_opts: dict[str, str] = field(default_factory=dict)
    sink_opts: dict[str, str] = field(default_factory=dict)
    runtime: str = "auto"  # inference.choices.BACKENDS
    providers: tuple[str, ...] = ()  # empty: the runtime's default order
    precision: str = "fp32"
    threads: int = 0
    size: tuple[int, int] | None = None  # (height, width) for models with dynamic spatial dims
    gpu: int | None = None  # CUDA device index; None: CPU only, or the runtime's default device
    cpu_max: float | None = None  # CPU cores (cgroup cpu.max), None: unlimited
    memory_max: int | None = None  # bytes (cgroup memory.max, else RLIMIT_AS), None: unlimited
    restart_min_s: float = 1.0  # back-off after a crash: doubles from min to max, reset after a stable run
    restart_max_s: float = 60.0
    enabled: bool = True


@dataclass(frozen=True)
class HealthConfig:
    """[health]: what is sampled, where it goes."""

    interval_s: float = 30.0
    otlp_url: str | None = None  # e.g. https://site:4318/v1/metrics; None: no upstream push
    otlp_headers: dict[str, str] = field(default_factory=dict)
    otlp_timeout_s: float = 10.0
    spool_max_reports: int = 10_000  # bounded: when full the oldest go, counted and reported
    prometheus_listen: str | None = "127.0.0.1:9464"  # host:port, None: off
    partitions: tuple[Path, ...] = (Path("/"), Path("/data"), Path("/boot/efi"))


@dataclass(frozen=True)
class UpdateConfig:
    """[update]: the update agent and the health gate."""

    server: str | None = None  # hawkBit DDI base URL; from <data>/identity/upstream.toml when unset
    tenant: str = "DEFAULT"
    controller_id: str | None = None  # default: the provisioned device id, else the host name
    token: str | None = None  # TargetToken; from <data>/identity/upstream.toml when unset
    gateway_token: str | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None  # mTLS; default: <data>/identity/device.pem and device.key if present
    client_key: Path | None = None
    poll_default_s: float = 300.0  # used until the server says otherwise; never below 30 s
    reboot: str = "immediate"  # immediate | window | manual
    maintenance_window: str | None = None  # "HH:MM-HH:MM" local time, for reboot = "window"
    gate_deadline_s: float = 300.0
    gate_required_units: tuple[str, ...] = ()
    gate_throughput_fraction: float = 0.8  # each loop must reach this fraction of its pre-update throughput
    gate_hold_s: float = 15.0  # how long every check must hold without a break before the gate passes
    delta: bool = True  # over HTTP(S), copy the rootfs chunks the booted slot holds (docs/delta.md)


@dataclass(frozen=True)
class DaemonConfig:
    path: Path = DEFAULT_PATH  # the main file; drop-ins from <path>.d/*.toml in name order
    bus: str = "system"  # system | session (development)
    control_group: str = "pitstop"  # members (and root) may call mutating D-Bus methods
    state_dir: Path = Path("/data/pitstop/daemon")
    log_level: str = "info"
    watchdog: bool = True
    health: HealthConfig = field(default_factory=HealthConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    loops: tuple[LoopConfig, ...] = ()
    data_dir: Path = DEFAULT_DATA_DIR  # the data partition (system.toml `data_dir`): identity, state

    def loop(self, name: str) -> LoopConfig | None:
        return next((lp for lp in self.loops if lp.name == name), None)


# --- kinds of values ----------------------------------------------------------------------------------------
# A Kind reads one value from TOML or JSON (`parse`, raising _Invalid with the problem), writes it to JSON (`dump`)
# and describes itself for the docs (`type_name`, `rule`).


class _Invalid(Exception):
    """A value breaks its rule; the caller names the file and key. `sub`: the position inside it (`[2]`, `.fps`)."""

    def __init__(self, problem: str, sub: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.sub = sub


def _what(value: object) -> str:
    if value is None:
        return "null"
    for t, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (list, "an array"),
        (dict, "a table"),
    ):
        if isinstance(value, t):
            return name
    return "a date or time"  # tomllib's remaining types


def _toml(value: Any) -> str:
    """A JSON-form value as TOML writes it (docs)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def _need(value: object, t: type | tuple[type, ...], what: str) -> None:
    if not isinstance(value, t) or (isinstance(value, bool) and bool not in (t if isinstance(t, tuple) else (t,))):
        raise _Invalid(f"must be {what}, not {_what(value)}")


class Kind:
    def type_name(self) -> str:
        return ""

    def rule(self) -> str:
        return ""

    def parse(self, value: object) -> Any:
        raise NotImplementedError

    def dump(self, value: Any) -> Any:
        return value


@dataclass(frozen=True)
class Choice(Kind):
    allowed: tuple[str, ...]

    def type_name(self) -> str:
        return "string"

    def rule(self) -> str:
        return "one of " + ", ".join(f"`{a}`" for a in self.allowed)

    def parse(self, value: object) -> str:
        _need(value, str, "a string")
        assert isinstance(value, str)
        if value not in self.allowed:
            raise _Invalid(f"{value!r} is not allowed (allowed: {', '.join(map(repr, self.allowed))})")
        return value


@dataclass(frozen=True)
class Text(Kind):
    words: str  # the rule in words: docs and messages
    pattern: str = r"[^\x00-\x1f\x7f]+"
    check: Callable[[str], str | None] | None = None  # an extra rule: None if fine, else the problem
    echo: bool = True  # False for secrets: messages do not repeat the value

    def type_name(self) -> str:
        return "string"

    def rule(self) -> str:
        return self.words

    def parse(self, value: object) -> str:
        _need(value, str, "a string")
        assert isinstance(value, str)
        shown = repr(value) if self.echo else "the value"
        if not re.fullmatch(self.pattern, value):
            raise _Invalid(f"{shown} is not allowed: {self.words}")
        if self.check is not None and (problem := self.check(value)) is not None:
            raise _Invalid(f"{shown} is not allowed: {problem}")
        return value


@dataclass(frozen=True)
class Flag(Kind):
    def type_name(self) -> str:
        return "boolean"

    def parse(self, value: object) -> bool:
        _need(value, bool, "true or false")
        assert isinstance(value, bool)
        return value


@dataclass(frozen=True)
class Int(Kind):
    lo: int
    hi: int

    def type_name(self) -> str:
        return "integer"

    def rule(self) -> str:
        return f"{self.lo} … {self.hi}"

    def parse(self, value: object) -> int:
        _need(value, int, "an integer")
        assert isinstance(value, int)
        if not self.lo <= value <= self.hi:
            raise _Invalid(f"{value} is out of range ({self.rule()})")
        return value


@dataclass(frozen=True)
class Number(Kind):
    lo: float
    hi: float
    lo_open: bool = False  # (lo, hi] instead of [lo, hi]

    def type_name(self) -> str:
        return "number"

    def rule(self) -> str:
        return f"> {self.lo:g} and ≤ {self.hi:g}" if self.lo_open else f"{self.lo:g} … {self.hi:g}"

    def parse(self, value: object) -> float:
        _need(value, (int, float), "a number")
        assert isinstance(value, int | float)
        x = float(value)
        if not math.isfinite(x) or not (self.lo < x if self.lo_open else self.lo <= x) or x > self.hi:
            raise _Invalid(f"{value} is out of range ({self.rule()})")
        return x


@dataclass(frozen=True)
class AbsPath(Kind):
    def type_name(self) -> str:
        return "path"

    def rule(self) -> str:
        return "absolute"

    def parse(self, value: object) -> Path:
        _need(value, str, "an absolute path (a string)")
        assert isinstance(value, str)
        if "\0" in value or not value.startswith("/"):
            raise _Invalid(f"{value!r} is not an absolute path")
        return Path(os.path.normpath(value))

    def dump(self, value: Any) -> Any:
        return str(value)


@dataclass(frozen=True)
class ListOf(Kind):
    item: Kind
    unique: bool = True

    def type_name(self) -> str:
        return f"array of {self.item.type_name()}"

    def rule(self) -> str:
        return self.item.rule()

    def parse(self, value: object) -> tuple[Any, ...]:
        _need(value, list, "an array")
        assert isinstance(value, list)
        out = []
        for i, v in enumerate(value, start=1):
            try:
                item = self.item.parse(v)
            except _Invalid as e:
                raise _Invalid(e.problem, f"[{i}]{e.sub}") from None
            if self.unique and item in out:
                raise _Invalid(f"{_toml(self.item.dump(item))} is listed twice", f"[{i}]")
            out.append(item)
        return tuple(out)

    def dump(self, value: Any) -> Any:
        return [self.item.dump(v) for v in value]


@dataclass(frozen=True)
class Scalar(Kind):
    """An option value: a string, number or boolean, kept as the string a command line would give."""

    def type_name(self) -> str:
        return "string, number or boolean"

    def parse(self, value: object) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str | int | float):
            text = str(value)
            if "\0" in text:
                raise _Invalid("must not contain NUL")
            return text
        raise _Invalid(f"must be a string, number or boolean, not {_what(value)}")


@dataclass(frozen=True)
class Map(Kind):
    """A table of names to values; one value as a whole (a drop-in replaces it, it does not merge into it)."""

    name_pattern: str
    name_words: str
    item: Kind

    def type_name(self) -> str:
        return "table"

    def rule(self) -> str:
        return f"names: {self.name_words}"

    def parse(self, value: object) -> dict[str, str]:
        _need(value, dict, "a table")
        assert isinstance(value, dict)
        out = {}
        for k, v in value.items():
            if not re.fullmatch(self.name_pattern, k):
                raise _Invalid(f"{k!r} is not allowed as a name: {self.name_words}")
            try:
                out[k] = self.item.parse(v)
            except _Invalid as e:
                raise _Invalid(e.problem, f".{k}{e.sub}") from None
        return out

    def dump(self, value: Any) -> Any:
        return dict(value)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class MemSize(Kind):
    lo: int
    hi: int = 1 << 50

    def type_name(self) -> str:
        return "size"

    def rule(self) -> str:
        return f'bytes, or with K, M, G, T (powers of 1024), e.g. `"512M"`; at least {self.lo >> 20}M'

    def parse(self, value: object) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        elif isinstance(value, str):
            m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:iB|B)?\s*", value, re.IGNORECASE)
            if m is None:
                raise _Invalid(f'{value!r} is not a size: use bytes, or a number with K, M, G or T, e.g. "512M"')
            n = int(float(m[1]) * _UNITS[m[2].upper()])
        else:
            raise _Invalid(f'must be a size such as "512M" or "2G", or a number of bytes, not {_what(value)}')
        if not self.lo <= n <= self.hi:
            raise _Invalid(f"{value!r} is out of range (at least {self.lo >> 20}M)")
        return n


_MAX_SIDE = 16384


@dataclass(frozen=True)
class HeightWidth(Kind):
    def type_name(self) -> str:
        return "string or [h, w]"

    def rule(self) -> str:
        return f'`"HxW"` (e.g. `"640x640"`) or `[h, w]`, each 1 … {_MAX_SIDE}'

    def parse(self, value: object) -> tuple[int, int]:
        hw: list[object]
        if isinstance(value, str):
            m = re.fullmatch(r"(\d+)[xX](\d+)", value)
            if m is None:
                raise _Invalid(f'{value!r} is not allowed: use "HEIGHTxWIDTH", e.g. "640x640", or [height, width]')
            hw = [int(m[1]), int(m[2])]
        elif isinstance(value, list) and len(value) == 2:
            hw = list(value)
        else:
            raise _Invalid(f'must be "HEIGHTxWIDTH" or [height, width], not {_what(value)}')
        for v in hw:
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= _MAX_SIDE:
                raise _Invalid(f"{value!r}: height and width must be integers 1 … {_MAX_SIDE}")
        h, w = hw
        assert isinstance(h, int) and isinstance(w, int)
        return (h, w)

    def dump(self, value: Any) -> Any:
        return list(value)


@dataclass(frozen=True)
class Section(Kind):
    table: Table

    def type_name(self) -> str:
        return "table"


@dataclass(frozen=True)
class Sections(Kind):
    table: Table

    def type_name(self) -> str:
        return "array of tables"


# --- rules --------------------------------------------------------------------------------------------------

_HHMM = r"([01]\d|2[0-3]):[0-5]\d"
WINDOW_RE = re.compile(rf"({_HHMM})-({_HHMM})")
_URL = r"https?://[^\s\"'\\]+"
_HOST = r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?"
_UNIT = r"[A-Za-z0-9:_.\\@-]{1,240}\.(service|socket|device|mount|automount|swap|target|path|timer|slice|scope)"
LOOP_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_DEVICE_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"  # image/provision.py DEVICE_ID_RE
_TOKEN = r"[!-~]{1,4096}"  # noqa: S105 - a pattern: printable ASCII, no spaces


def parse_window(text: str) -> tuple[Time, Time]:
    """A maintenance window "HH:MM-HH:MM" as (start, end); end before start wraps past midnight. ValueError."""
    m = WINDOW_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r}: use HH:MM-HH:MM (24-hour local time), e.g. 01:00-04:30")
    start, end = Time.fromisoformat(m[1]), Time.fromisoformat(m[3])
    if start == end:
        raise ValueError(f"{text!r}: the window is empty (start = end)")
    return start, end


def in_window(text: str, at: Time) -> bool:
    """Whether local time `at` falls in the window (start inclusive, end exclusive)."""
    start, end = parse_window(text)
    t = at.replace(tzinfo=None)
    return start <= t < end if start < end else (t >= start or t < end)


def _window_problem(text: str) -> str | None:
    try:
        parse_window(text)
    except ValueError:
        return 'use HH:MM-HH:MM (24-hour local time, start ≠ end; it may wrap past midnight), e.g. "01:00-04:30"'
    return None


def _listen_problem(text: str) -> str | None:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        return 'use HOST:PORT with a port 1 … 65535, e.g. "127.0.0.1:9464" or "[::1]:9464"'
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"{host} is not an IPv6 address"
        return None
    if not re.fullmatch(_HOST, host):
        return f"{host!r} is not a host name or IPv4 address (IPv6: in brackets)"
    return None


# --- the tables ---------------------------------------------------------------------------------------------


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Setting:
    key: str  # the TOML key
    kind: Kind
    doc: str
    default: Any = REQUIRED
    dest: str = ""  # the dataclass field, when it is not the key
    live: bool = True  # a reload (SIGHUP) applies a change; False: needs a restart
    nullable: bool | None = None  # `""` (JSON: null) unsets it; default: whether the default is None
    secret: bool = False  # as_dict hides it unless asked
    shown: str = ""  # the default as the docs show it, where the value alone would mislead
    unset_means: str = "unset"  # what `""` means, for the docs
    derive: Callable[[Path], Any] | None = None  # a default computed from data_dir

    @property
    def attr(self) -> str:
        return self.dest or self.key

    @property
    def can_unset(self) -> bool:
        return self.default is None if self.nullable is None else self.nullable


@dataclass(frozen=True)
class Table:
    name: str  # "" for the top level
    cls: type
    settings: tuple[Setting, ...]
    doc: str

    def setting(self, key: str) -> Setting:
        return next(s for s in self.settings if s.key == key)

    @property
    def values(self) -> tuple[Setting, ...]:
        return tuple(s for s in self.settings if not isinstance(s.kind, Section | Sections))


LOOP = Table(
    "loop",
    LoopConfig,
    (
        Setting(
            "name",
            Text(
                "lower-case letters, digits and `-`, starting with a letter or digit; at most 63", LOOP_NAME_RE.pattern
            ),
            "Name: unique, it identifies the loop (D-Bus, logs, drop-ins).",
        ),
        Setting(
            "model",
            AbsPath(),
            "The model file (ONNX or a TensorRT engine). Its existence is checked when the "
            "loop starts, not when the configuration is read.",
        ),
        Setting(
            "source",
            Text("a source URI or path; checked when the loop starts"),
            "Where frames come from: `synthetic:`, `dir:PATH`, `file:PATH`, `rtsp://…`, `v4l2:/dev/videoN` "
            "(docs/inference-sources-sinks.md).",
            "synthetic:",
        ),
        Setting(
            "sink",
            Text("a sink URI; checked when the loop starts"),
            "Where results go: `-` (JSON lines on the loop's stdout: the journal), `jsonl:PATH`, "
            "`mqtt://host:port/topic`, `mqtts://…`.",
            "-",
        ),
        Setting(
            "source_opts",
            Map(r"[a-z_][a-z0-9_]{0,63}", "lower-case letters, digits, `_`", Scalar()),
            "Options of the source (e.g. `{ fps = 10, loop = true }`), checked when the loop starts.",
            {},
        ),
        Setting(
            "sink_opts",
            Map(r"[a-z_][a-z0-9_]{0,63}", "lower-case letters, digits, `_`", Scalar()),
            "Options of the sink (e.g. `{ qos = 1 }`), checked when the loop starts.",
            {},
        ),
        Setting(
            "runtime", Choice(BACKENDS), "Inference runtime; `auto`: TensorRT if installed, else ONNX Runtime.", "auto"
        ),
        Setting(
            "providers",
            ListOf(Choice(PROVIDERS)),
            "ONNX Runtime execution providers in preference order; `[]`: the runtime's default order.",
            (),
        ),
        Setting("precision", Choice(PRECISIONS), "Inference precision.", "fp32"),
        Setting("threads", Int(0, 1024), "CPU intra-op threads; 0: one per physical core.", 0),
        Setting("size", HeightWidth(), "Input height and width, for models with dynamic spatial dimensions.", None),
        Setting("gpu", Int(0, 63), "CUDA device index; unset: the runtime's default device (or CPU only).", None),
        Setting("cpu_max", Number(0.01, 1024), "CPU limit in cores (cgroup `cpu.max`); unset: unlimited.", None),
        Setting(
            "memory_max",
            MemSize(32 << 20),
            "Memory limit (cgroup `memory.max`, else `RLIMIT_AS`); unset: unlimited.",
            None,
        ),
        Setting(
            "restart_min_s",
            Number(0.1, 3600),
            "Back-off after a crash, in seconds: starts here, doubles up to "
            "`restart_max_s`, resets after a stable run.",
            1.0,
        ),
        Setting("restart_max_s", Number(0.1, 86400), "Longest back-off, in seconds; at least `restart_min_s`.", 60.0),
        Setting(
            "enabled",
            Flag(),
            "Run it; `false` keeps it configured but stopped (a drop-in can switch a loop off).",
            True,
        ),
    ),
    "One supervised inference loop, in its own process (repeat `[[loop]]`). A drop-in's `[[loop]]` with the name of "
    "an existing loop changes that loop key by key; a new name adds a loop.",
)

HEALTH = Table(
    "health",
    HealthConfig,
    (
        Setting("interval_s", Number(1, 86400), "Seconds between health samples (and OTLP pushes).", 30.0),
        Setting(
            "otlp_url",
            Text("an http:// or https:// URL", _URL),
            "OTLP/HTTP metrics endpoint (e.g. `https://site:4318/v1/metrics`). Unset: `metrics_url` from "
            "`<data_dir>/identity/upstream.toml` (then, unless `otlp_headers` is set, sent with "
            "`Authorization: TargetToken <token>` of the same file), else no upstream push.",
            None,
            shown="from identity",
            unset_means="none, not even from identity (no upstream push)",
        ),
        Setting(
            "otlp_headers",
            Map(
                r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}", "HTTP header names", Text("printable, no line breaks", echo=False)
            ),
            'HTTP headers sent with each push (e.g. `{ Authorization = "Bearer …" }`).',
            {},
            secret=True,
        ),
        Setting("otlp_timeout_s", Number(0, 300, lo_open=True), "Timeout of one push, in seconds.", 10.0),
        Setting(
            "spool_max_reports",
            Int(1, 10_000_000),
            "Reports kept on disk while upstream is unreachable; when full the oldest go (counted and reported).",
            10_000,
        ),
        Setting(
            "prometheus_listen",
            Text("`HOST:PORT`", check=_listen_problem),
            "Where the Prometheus text endpoint listens.",
            "127.0.0.1:9464",
            live=False,
            nullable=True,
            unset_means="off",
        ),
        Setting(
            "partitions",
            ListOf(AbsPath()),
            "Mount points whose usage is reported.",
            (Path("/"), Path("/data"), Path("/boot/efi")),
            shown='`["/", "<data_dir>", "/boot/efi"]`',
            derive=lambda d: (Path("/"), d, Path("/boot/efi")),
        ),
    ),
    "Health sampling and reporting (OTLP push with an on-disk spool; local Prometheus endpoint).",
)

UPDATE = Table(
    "update",
    UpdateConfig,
    (
        Setting(
            "server",
            Text("an http:// or https:// URL", _URL),
            "hawkBit DDI base URL. Unset: `url` from `<data_dir>/identity/upstream.toml`.",
            None,
            live=False,
            shown="from identity",
            unset_means="none, not even from identity (offline updates only)",
        ),
        Setting(
            "tenant",
            Text("letters, digits, `.`, `_`, `-`; at most 64", r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"),
            "hawkBit tenant.",
            "DEFAULT",
            live=False,
        ),
        Setting(
            "controller_id",
            Text("1-64 letters, digits, `.`, `_`, `-`", _DEVICE_ID),
            "hawkBit controller id. "
            "Unset: the provisioned device id (`<data_dir>/identity/device-id`), else the host name.",
            None,
            live=False,
            nullable=False,
            shown="device id, else host name",
        ),
        Setting(
            "token",
            Text("printable ASCII without spaces", _TOKEN, echo=False),
            "TargetToken. Unset: `token` from `<data_dir>/identity/upstream.toml` (unless `gateway_token` is set).",
            None,
            live=False,
            secret=True,
            shown="from identity",
        ),
        Setting(
            "gateway_token",
            Text("printable ASCII without spaces", _TOKEN, echo=False),
            "GatewayToken, instead of `token`.",
            None,
            live=False,
            secret=True,
        ),
        Setting(
            "ca_file",
            AbsPath(),
            "CA certificates (PEM) to verify the server with; unset: the system's.",
            None,
            live=False,
        ),
        Setting(
            "client_cert",
            AbsPath(),
            "Client certificate chain (PEM) for mTLS, with `client_key`. Unset: "
            "`<data_dir>/identity/device.pem` if it and `device.key` exist.",
            None,
            live=False,
            shown="from identity",
        ),
        Setting(
            "client_key",
            AbsPath(),
            "Private key of `client_cert`. Unset: `<data_dir>/identity/device.key`.",
            None,
            live=False,
            shown="from identity",
        ),
        Setting(
            "poll_default_s",
            Number(MIN_POLL_S, 7 * 86400),
            "Seconds between polls until the server says otherwise; the server's sleep is also never taken below 30 s.",
            300.0,
        ),
        Setting(
            "reboot",
            Choice(("immediate", "window", "manual")),
            "When to reboot into an installed update: at once, in `maintenance_window`, or when told (over D-Bus).",
            "immediate",
        ),
        Setting(
            "maintenance_window",
            Text("`HH:MM-HH:MM`, local time, may wrap past midnight", check=_window_problem),
            'When `reboot = "window"` may reboot (required then), e.g. `"01:00-04:30"`.',
            None,
        ),
        Setting(
            "gate_deadline_s",
            Number(10, 86400),
            "Seconds an update has to pass the health gate, from the gate's start (the daemon's start in the new "
            "slot's first boot, or the switch to new models/files), before it is rolled back.",
            300.0,
        ),
        Setting(
            "gate_required_units",
            ListOf(Text("systemd unit names", _UNIT)),
            "systemd units that must be active for the gate to pass.",
            (),
        ),
        Setting(
            "gate_throughput_fraction",
            Number(0, 1, lo_open=True),
            "Each enabled loop must reach this fraction of its throughput before the update (measured over the last "
            "`gate_hold_s` of its run).",
            0.8,
        ),
        Setting(
            "gate_hold_s",
            Number(0, 3600),
            "Seconds every gate check must hold without a break before the gate passes (a loop that starts "
            "and then crashes does not pass).",
            15.0,
        ),
        Setting(
            "delta",
            Flag(),
            "Delta installs: over HTTP(S), copy the rootfs chunks the booted slot already holds and download only "
            "the others (docs/delta.md); `false` downloads whole bundles. Also for `Install` of a URL over D-Bus.",
            True,
            live=False,
        ),
    ),
    "The update agent (hawkBit DDI client) and the health gate that commits or rolls back an update.",
)

TOP = Table(
    "",
    DaemonConfig,
    (
        Setting("bus", Choice(("system", "session")), "D-Bus bus; `session` for development.", "system", live=False),
        Setting(
            "control_group",
            Text("a group name", r"[a-z_][a-z0-9_-]{0,31}"),
            "Members of this group (and root) may call the mutating D-Bus methods.",
            "pitstop",
            live=False,
        ),
        Setting(
            "state_dir",
            AbsPath(),
            "The daemon's state (spool, loop statistics).",
            Path("/data/pitstop/daemon"),
            live=False,
            shown="`<data_dir>/pitstop/daemon`",
            derive=lambda d: d / "pitstop" / "daemon",
        ),
        Setting(
            "log_level", Choice(("debug", "info", "warning", "error", "critical")), "Least severe level logged.", "info"
        ),
        Setting(
            "watchdog",
            Flag(),
            "Ping systemd's watchdog (`WatchdogSec=` in the unit) from the event loop.",
            True,
            live=False,
        ),
        Setting("health", Section(HEALTH), "Health."),
        Setting("update", Section(UPDATE), "Updates."),
        Setting("loop", Sections(LOOP), "Inference loops.", (), dest="loops"),
    ),
    "The top level.",
)

_NOT_SETTINGS = ("path", "data_dir")  # DaemonConfig fields that are not keys of the file
_SECTIONS = {"health": HEALTH, "update": UPDATE}


def _check_tables() -> None:
    for table in (TOP, HEALTH, UPDATE, LOOP):
        fields = [f.name for f in dataclasses.fields(table.cls) if f.name not in _NOT_SETTINGS]
        if fields != [s.attr for s in table.settings]:
            raise AssertionError(f"config table {table.name or 'top'}: settings do not match {table.cls.__name__}")


_check_tables()


# --- reading files ------------------------------------------------------------------------------------------


def _fail(file: str, key: str, problem: str) -> DaemonConfigError:
    return DaemonConfigError(f"{file}: {key}: {problem}" if key else f"{file}: {problem}")


def _read(path: Path, limit: int = MAX_FILE) -> bytes | None:
    """The file's bytes; None if it does not exist."""
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DaemonConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > limit:
        raise DaemonConfigError(f"{path}: larger than {limit} bytes; not a configuration file")
    return data


def _toml_file(path: Path) -> dict[str, Any] | None:
    data = _read(path)
    if data is None:
        return None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise DaemonConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise DaemonConfigError(f"{path}: not valid TOML: {e}") from None


def dropin_dir(path: Path) -> Path:
    return Path(f"{path}.d")


def dropins(path: Path) -> list[Path]:
    """`<path>.d/*.toml` in name order (byte order of the names, as systemd sorts drop-ins); hidden files skipped."""
    d = dropin_dir(path)
    try:
        names = os.listdir(d)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise DaemonConfigError(f"{d}: cannot list the drop-in directory: {e.strerror or e}") from None
    return [d / n for n in sorted(names, key=os.fsencode) if n.endswith(".toml") and not n.startswith(".")]


# --- one file: validated values -----------------------------------------------------------------------------


@dataclass
class _Layer:
    """The values one file sets, each checked on its own; what the file leaves out is absent."""

    file: str
    top: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, dict[str, Any]] = field(default_factory=lambda: {"health": {}, "update": {}})
    loops: dict[str, dict[str, Any]] = field(default_factory=dict)  # by name, in file order


def _value(s: Setting, value: object, file: str, key: str) -> Any:
    if s.can_unset and (value is None or value == ""):
        return None
    try:
        return s.kind.parse(value)
    except _Invalid as e:
        raise _fail(file, key + e.sub, e.problem) from None


def _unknown(table: Table, raw: Mapping[str, Any], file: str, key: str, extra: Sequence[str] = ()) -> None:
    known = [s.key for s in table.settings] + list(extra)
    for k in raw:
        if k not in known:
            close = difflib.get_close_matches(k, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"{key}: " if key else ""
            raise DaemonConfigError(f"{file}: {where}unknown key {k!r}{hint}; allowed: {', '.join(known)}")


def _table_values(table: Table, raw: object, file: str, key: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _fail(file, key, f"must be a table ([{key}]), not {_what(raw)}")
    _unknown(table, raw, file, key)
    return {s.key: _value(s, raw[s.key], file, f"{key}.{s.key}") for s in table.settings if s.key in raw}


def _layer(raw: Mapping[str, Any], file: str, extra: Sequence[str] = ()) -> _Layer:
    layer = _Layer(file)
    _unknown(TOP, raw, file, "", extra)
    for s in TOP.values:
        if s.key in raw:
            layer.top[s.key] = _value(s, raw[s.key], file, s.key)
    for name in ("health", "update"):
        if name in raw:
            layer.sections[name] = _table_values(_SECTIONS[name], raw[name], file, name)
    loops = raw.get("loop", [])
    if not isinstance(loops, list):
        raise _fail(file, "loop", f"must be an array of tables ([[loop]]), not {_what(loops)}")
    name_setting = LOOP.setting("name")
    for i, t in enumerate(loops, start=1):
        if not isinstance(t, dict):
            raise _fail(file, f"loop[{i}]", f"must be a table ([[loop]]), not {_what(t)}")
        if "name" not in t:
            raise _fail(file, f"loop[{i}].name", "is required: it identifies the loop")
        name = _value(name_setting, t["name"], file, f"loop[{i}].name")
        key = f"loop[{name}]"
        if name in layer.loops:
            raise _fail(file, key, "defined twice in this file (loop names are unique)")
        values = _table_values(LOOP, t, file, key)
        layer.loops[name] = values
    return layer


# --- merging files, then the whole ------------------------------------------------------------------------


@dataclass
class _Merged:
    """The values of all files, later files winning key by key; `origin`: dotted key -> the file that set it."""

    main: str
    layer: _Layer
    origin: dict[str, str] = field(default_factory=dict)

    def where(self, *keys: str) -> str:
        """The file that set the first of `keys` that a file set (the main file where none did: defaults)."""
        return next((self.origin[k] for k in keys if k in self.origin), self.main)


def _merge(layers: Sequence[_Layer], main: str) -> _Merged:
    m = _Merged(main, _Layer(main))
    for layer in layers:
        for k, v in layer.top.items():
            m.layer.top[k] = v
            m.origin[k] = layer.file
        for name, values in layer.sections.items():
            for k, v in values.items():
                m.layer.sections[name][k] = v
                m.origin[f"{name}.{k}"] = layer.file
        for name, values in layer.loops.items():
            key = f"loop[{name}]"
            m.origin.setdefault(key, layer.file)
            m.layer.loops.setdefault(name, {}).update(values)
            for k in values:
                m.origin[f"{key}.{k}"] = layer.file
    return m


def _defaults(table: Table, data_dir: Path) -> dict[str, Any]:
    return {
        s.key: s.derive(data_dir) if s.derive is not None else s.default
        for s in table.values
        if s.default is not REQUIRED
    }


def _build(m: _Merged, path: Path, data_dir: Path) -> DaemonConfig:
    loops = []
    for name, values in m.layer.loops.items():
        key = f"loop[{name}]"
        if "model" not in values:
            raise _fail(m.where(key), f"{key}.model", "is required (an absolute path: the model file)")
        v = _defaults(LOOP, data_dir) | values
        if v["restart_max_s"] < v["restart_min_s"]:
            k = "restart_max_s" if f"{key}.restart_max_s" in m.origin else "restart_min_s"
            raise _fail(
                m.where(f"{key}.{k}"),
                f"{key}.{k}",
                f"restart_max_s ({v['restart_max_s']:g}) must be at least restart_min_s ({v['restart_min_s']:g})",
            )
        loops.append(LoopConfig(**v))
    health = HealthConfig(**(_defaults(HEALTH, data_dir) | m.layer.sections["health"]))
    u = _defaults(UPDATE, data_dir) | m.layer.sections["update"]
    if u["reboot"] == "window" and u["maintenance_window"] is None:
        raise _fail(
            m.where("update.maintenance_window", "update.reboot"),
            "update.maintenance_window",
            'is required with reboot = "window" ("HH:MM-HH:MM", local time)',
        )
    if u["token"] is not None and u["gateway_token"] is not None:
        raise _fail(m.where("update.gateway_token"), "update.gateway_token", "set token or gateway_token, not both")
    if u["gate_hold_s"] >= u["gate_deadline_s"]:
        raise _fail(
            m.where("update.gate_hold_s", "update.gate_deadline_s"),
            "update.gate_hold_s",
            f"must be shorter than gate_deadline_s ({u['gate_deadline_s']:g}): the gate could never pass",
        )
    top = _defaults(TOP, data_dir) | m.layer.top
    return DaemonConfig(
        path=path, health=health, update=UpdateConfig(**u), loops=tuple(loops), data_dir=data_dir, **top
    )


def _check_pairs(config: DaemonConfig, m: _Merged) -> None:
    u = config.update
    if (u.client_cert is None) != (u.client_key is None):
        key = "update.client_cert" if u.client_cert is None else "update.client_key"
        raise _fail(
            m.where("update.client_cert", "update.client_key"),
            key,
            "is required with "
            + ("client_key" if u.client_cert is None else "client_cert")
            + " (mTLS needs the certificate and its key)",
        )


# --- identity -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """What factory provisioning wrote to `<data_dir>/identity/` (image/provision.py); None: not there."""

    device_id: str | None = None
    server: str | None = None
    token: str | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    metrics_url: str | None = None


def read_identity(data_dir: Path) -> Identity:
    """The device's identity files; DaemonConfigError naming the file if one is unreadable or malformed."""
    d = data_dir / IDENTITY_DIR
    device_id = None
    raw_id = _read(d / "device-id", 4096)
    if raw_id is not None:
        text = raw_id.decode("utf-8", "replace").strip()
        if not re.fullmatch(_DEVICE_ID, text):
            raise DaemonConfigError(
                f"{d / 'device-id'}: {text!r} is not a device id "
                "(1-64 letters, digits, '.', '_', '-', starting with a letter or digit)"
            )
        device_id = text
    server = token = metrics_url = None
    upstream = _toml_file(d / "upstream.toml")
    if upstream is not None:
        file = str(d / "upstream.toml")
        # Only the keys provisioning writes are read; others are left for newer daemons.
        if "url" in upstream:
            server = _value(UPDATE.setting("server"), upstream["url"], file, "url")
        if "token" in upstream:
            token = _value(UPDATE.setting("token"), upstream["token"], file, "token")
        if "metrics_url" in upstream:
            metrics_url = _value(HEALTH.setting("otlp_url"), upstream["metrics_url"], file, "metrics_url")
    cert, key = d / "device.pem", d / "device.key"
    pair = (cert, key) if cert.is_file() and key.is_file() else (None, None)
    return Identity(device_id, server, token, pair[0], pair[1], metrics_url)


def _with_identity(config: DaemonConfig, m: _Merged, ident: Identity) -> DaemonConfig:
    """Identity values as defaults: only for keys no file set (`""` in a file counts as set)."""
    u = config.update
    changes: dict[str, Any] = {}

    def unset(key: str) -> bool:
        return f"update.{key}" not in m.origin

    if unset("controller_id"):
        changes["controller_id"] = ident.device_id or socket.gethostname()
    if unset("server") and ident.server is not None:
        changes["server"] = ident.server
    if unset("token") and unset("gateway_token") and ident.token is not None:
        changes["token"] = ident.token
    if unset("client_cert") and unset("client_key") and ident.client_cert is not None:
        changes["client_cert"], changes["client_key"] = ident.client_cert, ident.client_key
    health = config.health
    if "health.otlp_url" not in m.origin and ident.metrics_url is not None:
        # The provisioned endpoint is the site's: it knows the device by the token it was provisioned with.
        headers = health.otlp_headers
        if "health.otlp_headers" not in m.origin and ident.token is not None:
            headers = {"Authorization": f"TargetToken {ident.token}"}
        health = dataclasses.replace(health, otlp_url=ident.metrics_url, otlp_headers=headers)
    return dataclasses.replace(config, update=dataclasses.replace(u, **changes), health=health)


# --- public -------------------------------------------------------------------------------------------------


def system_data_dir() -> Path:
    """The data partition's mount point from the system configuration; /data when there is none."""
    path = system_config.default_path()
    if not path.exists():
        return DEFAULT_DATA_DIR
    return system_config.load(path).data_dir


def load(path: Path = DEFAULT_PATH, *, data_dir: Path | None = None) -> DaemonConfig:
    """The configuration from `path` and its drop-ins (`<path>.d/*.toml`, name order, later wins), with the
    device's identity from `<data_dir>/identity/` as defaults. A missing main file means all defaults (drop-ins
    still apply). `data_dir`: default from the system configuration (ota/system_config.py).

    Raises DaemonConfigError (naming the file, key and what is allowed); ConfigError (ota) for an invalid
    system configuration when `data_dir` is not given.
    """
    path = Path(path)
    data_dir = system_data_dir() if data_dir is None else Path(data_dir)
    layers = []
    for file in [path, *dropins(path)]:
        raw = _toml_file(file)
        if raw is not None:
            layers.append(_layer(raw, str(file)))
    m = _merge(layers, str(path))
    config = _with_identity(_build(m, path, data_dir), m, read_identity(data_dir))
    _check_pairs(config, m)
    return config


def loads(text: str, path: Path = DEFAULT_PATH, *, data_dir: Path = DEFAULT_DATA_DIR) -> DaemonConfig:
    """One file's text alone: no drop-ins, no identity (for checking a file before it is installed)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DaemonConfigError(f"{path}: not valid TOML: {e}") from None
    m = _merge([_layer(raw, str(path))], str(path))
    config = _build(m, path, data_dir)
    _check_pairs(config, m)
    return config


REDACTED = "(redacted)"


def as_dict(config: DaemonConfig, *, secrets: bool = False) -> dict[str, Any]:
    """The configuration as JSON-able data, every default filled in: the keys of the file plus `path` and
    `data_dir`. Tokens and OTLP header values read `"(redacted)"` unless `secrets`."""

    def table(t: Table, obj: Any) -> dict[str, Any]:
        out = {}
        for s in t.values:
            v = getattr(obj, s.attr)
            v = None if v is None else s.kind.dump(v)
            if s.secret and not secrets and v:
                v = {k: REDACTED for k in v} if isinstance(v, dict) else REDACTED
            out[s.key] = v
        return out

    return {
        "path": str(config.path),
        "data_dir": str(config.data_dir),
        **table(TOP, config),
        "health": table(HEALTH, config.health),
        "update": table(UPDATE, config.update),
        "loop": [table(LOOP, lp) for lp in config.loops],
    }


def from_dict(data: object, where: str = "JSON") -> DaemonConfig:
    """The inverse of `as_dict(config, secrets=True)`, validated like a file (null unsets what `""` unsets); no
    drop-ins, no identity."""
    if not isinstance(data, dict):
        raise DaemonConfigError(f"{where}: must be an object, not {_what(data)}")
    paths = {}
    for k, default in (("path", DEFAULT_PATH), ("data_dir", DEFAULT_DATA_DIR)):
        paths[k] = _value(Setting(k, AbsPath(), ""), data[k], where, k) if k in data else default
    m = _merge([_layer(data, where, _NOT_SETTINGS)], where)
    config = _build(m, paths["path"], paths["data_dir"])
    _check_pairs(config, m)
    return config


def reload_diff(old: DaemonConfig, new: DaemonConfig) -> tuple[set[str], set[str]]:
    """The keys that differ, as (applied live on SIGHUP, need a restart). Keys are dotted (`health.interval_s`);
    a loop added, removed or changed is `loop[NAME]` (always live: the supervisor restarts just that loop)."""
    live: set[str] = set()
    restart: set[str] = set()

    def compare(t: Table, a: Any, b: Any, prefix: str) -> None:
        for s in t.values:
            if getattr(a, s.attr) != getattr(b, s.attr):
                (live if s.live else restart).add(prefix + s.key)

    compare(TOP, old, new, "")
    compare(HEALTH, old.health, new.health, "health.")
    compare(UPDATE, old.update, new.update, "update.")
    if old.data_dir != new.data_dir:
        restart.add("data_dir")
    before = {lp.name: lp for lp in old.loops}
    after = {lp.name: lp for lp in new.loops}
    live |= {f"loop[{n}]" for n in before.keys() | after.keys() if before.get(n) != after.get(n)}
    return live, restart


# --- docs ---------------------------------------------------------------------------------------------------


def _default_text(s: Setting) -> str:
    if s.shown:
        return s.shown
    if s.default is REQUIRED:
        return "— (required)"
    if s.default is None:
        return "— (unset)"
    return f"`{_toml(s.kind.dump(s.default))}`"


def _rule_text(s: Setting) -> str:
    rule = s.kind.rule()
    if s.can_unset:
        rule = f'{rule}; `""`: {s.unset_means}' if rule else f'`""`: {s.unset_means}'
    return rule.replace("|", "\\|")


def table_markdown(table: Table) -> list[str]:
    lines = ["| key | type | default | allowed | on reload | meaning |", "| --- | --- | --- | --- | --- | --- |"]
    for s in table.values:
        reload = "applied" if s.live else "restart"
        doc = s.doc.replace("|", "\\|")
        lines.append(f"| `{s.key}` | {s.kind.type_name()} | {_default_text(s)} | {_rule_text(s)} | {reload} | {doc} |")
    return lines


def render_docs() -> str:
    """The reference section of docs/daemon-config.md, generated from the tables."""
    out = ["### Top level", "", *table_markdown(TOP), ""]
    for header, table in (("`[health]`", HEALTH), ("`[update]`", UPDATE), ("`[[loop]]`", LOOP)):
        out += [f"### {header}", "", table.doc, "", *table_markdown(table), ""]
    return "\n".join(out)


DOCS_BEGIN = docgen.begin_marker("daemon/config.py", "pitstop.daemon.config", "docs/daemon-config.md")


def splice_docs(doc: str) -> str:
    """`doc` (docs/daemon-config.md) with its generated section replaced by `render_docs()`."""
    return docgen.splice(doc, DOCS_BEGIN, render_docs())


def main(argv: Sequence[str] | None = None) -> int:
    return docgen.main(argv, "pitstop.daemon.config", "docs/daemon-config.md", splice_docs)


if __name__ == "__main__":
    raise SystemExit(main())
