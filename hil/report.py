"""The run's report: `report.md`, a self-contained `report.html` and `report.json` in the run directory.

- the run: when, the target, the image, the options that shape it (power cuts, seed), the totals;
- each test: outcome, duration, why it failed or was skipped;
- each device a test used: its timeline (run time, time since the previous event, wall clock, source, event),
  its serial log copied into the run directory and linked (in the HTML also embedded, so the one file can be
  mailed around), other artifacts linked;
- figures the scenarios record (`rig.report.figure("reboot_to_serving_s", 41.2, "s")`): one row per name with
  count, min, median, max; each value with its test in report.json.

The report is written after every test, not only at the end: a run that dies half way still leaves one.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import statistics
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pitstop.hil.timeline import Event

if TYPE_CHECKING:
    from pitstop.hil.target import Target

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
_EMBED_LIMIT = 1 << 20  # bytes of each serial log embedded in report.html (the whole file is linked)
_DETAILS_LIMIT = 8000


@dataclass(frozen=True)
class Figure:
    name: str
    value: float
    unit: str
    test: str


@dataclass
class DeviceRecord:
    key: str  # its directory under devices/
    name: str
    kind: str
    test: str
    events: list[Event]
    files: dict[str, str]  # label -> path relative to the run directory

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "name": self.name,
            "kind": self.kind,
            "test": self.test,
            "files": self.files,
            "timeline": [e.as_json() for e in self.events],
        }


@dataclass
class TestRecord:
    nodeid: str
    outcome: str = "running"
    duration: float = 0.0
    started: float = 0.0  # Unix time
    message: str = ""  # one line: why it failed or was skipped
    details: str = ""  # the failure as pytest reported it
    devices: list[DeviceRecord] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "nodeid": self.nodeid,
            "outcome": self.outcome,
            "duration": round(self.duration, 3),
            "started": _iso(self.started) if self.started else None,
            "message": self.message,
            "details": self.details,
            "devices": [d.key for d in self.devices],
        }


@dataclass(frozen=True)
class FigureSummary:
    name: str
    unit: str
    count: int
    min: float
    median: float
    max: float


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _clock(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%H:%M:%S.%f")[:-3]


def _slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:limit] or "x"


def _num(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


class Report:
    def __init__(self, run_dir: Path, *, title: str = "pitstop HIL run", meta: dict[str, str] | None = None) -> None:
        self.run_dir = run_dir
        self.title = title
        self.meta: dict[str, str] = dict(meta or {})
        self.started = datetime.now(UTC).timestamp()
        self.finished: float | None = None
        self.tests: dict[str, TestRecord] = {}
        self.figures: list[Figure] = []
        self.current: str | None = None  # the test running now: figures and devices go to it
        self._lock = threading.Lock()
        run_dir.mkdir(parents=True, exist_ok=True)

    # --- recording ---------------------------------------------------------------------------------------------

    def test(self, nodeid: str) -> TestRecord:
        with self._lock:
            rec = self.tests.get(nodeid)
            if rec is None:
                rec = self.tests[nodeid] = TestRecord(nodeid, started=datetime.now(UTC).timestamp())
            return rec

    def figure(self, name: str, value: float, unit: str = "", *, test: str | None = None) -> None:
        """A measurement of the current test (`reboot_to_serving_s`, 41.2): aggregated over the run by name."""
        who = test or self.current or ""
        with self._lock:
            self.figures.append(Figure(name, float(value), unit, who))

    def attach_device(self, target: Target, *, test: str | None = None) -> DeviceRecord:
        """Copy the device's serial log and artifacts into the run directory and record its timeline."""
        nodeid = test or self.current or ""
        rec = self.test(nodeid)
        with self._lock:
            n = sum(len(t.devices) for t in self.tests.values()) + 1
        key = f"{n:03d}-{_slug(nodeid.split('::', 1)[-1] or 'session', 48)}-{_slug(target.name, 24)}"
        dest = self.run_dir / "devices" / key
        dest.mkdir(parents=True, exist_ok=True)
        files: dict[str, str] = {}
        for label, path in target.artifacts().items():
            if path.is_file():
                copy = dest / path.name
                if path.resolve() != copy.resolve():
                    shutil.copyfile(path, copy)
                files[label] = copy.relative_to(self.run_dir).as_posix()
        dev = DeviceRecord(key, target.name, target.kind, nodeid, target.timeline.events, files)
        with self._lock:
            rec.devices.append(dev)
        return dev

    # --- summaries ---------------------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(OUTCOMES, 0)
        for t in self.tests.values():
            out[t.outcome] = out.get(t.outcome, 0) + 1
        return {k: v for k, v in out.items() if v}

    def figure_summary(self) -> list[FigureSummary]:
        by_name: dict[str, list[Figure]] = {}
        for f in self.figures:
            by_name.setdefault(f.name, []).append(f)
        out = []
        for name in sorted(by_name):
            values = [f.value for f in by_name[name]]
            units = {f.unit for f in by_name[name] if f.unit}
            out.append(
                FigureSummary(
                    name, ", ".join(sorted(units)), len(values), min(values), statistics.median(values), max(values)
                )
            )
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "started": _iso(self.started),
            "finished": _iso(self.finished) if self.finished else None,
            "meta": self.meta,
            "counts": self.counts(),
            "tests": [t.as_json() for t in self.tests.values()],
            "devices": [d.as_json() for t in self.tests.values() for d in t.devices],
            "figures": {
                "summary": [s.__dict__ for s in self.figure_summary()],
                "values": [f.__dict__ for f in self.figures],
            },
        }

    # --- Markdown ----------------------------------------------------------------------------------------------

    def render_markdown(self) -> str:
        out = [f"# {self.title}", ""]
        out += [f"- started: {_iso(self.started)}"]
        if self.finished:
            out += [f"- finished: {_iso(self.finished)} ({self.finished - self.started:.1f} s)"]
        out += [f"- {k}: {v}" for k, v in self.meta.items()]
        out += ["- result: " + (", ".join(f"{n} {k}" for k, n in self.counts().items()) or "no tests"), ""]
        out += ["## Tests", "", "| test | outcome | duration | devices | note |", "| --- | --- | ---: | --- | --- |"]
        for t in self.tests.values():
            devs = ", ".join(f"[{d.name}](#{d.key})" for d in t.devices)
            out.append(f"| {_code(t.nodeid)} | **{t.outcome}** | {t.duration:.1f} s | {devs} | {_md(t.message)} |")
        out.append("")
        summary = self.figure_summary()
        if summary:
            out += [
                "## Figures",
                "",
                "| figure | unit | count | min | median | max |",
                "| --- | --- | ---: | ---: | ---: | ---: |",
            ]
            for s in summary:
                out.append(
                    f"| {_md(s.name)} | {_md(s.unit)} | {s.count} | {_num(s.min)} | {_num(s.median)} | {_num(s.max)} |"
                )
            out.append("")
        failed = [t for t in self.tests.values() if t.outcome in ("failed", "error") and t.details]
        if failed:
            out += ["## Failures", ""]
            for t in failed:
                fence = _fence(t.details)
                out += [f"### {_code(t.nodeid)}", "", fence, _clip(t.details), fence, ""]
        devices = [d for t in self.tests.values() for d in t.devices]
        if devices:
            out += ["## Devices", ""]
        for d in devices:
            out += [f'<a id="{d.key}"></a>', "", f"### {_md(d.name)} ({d.kind}) in {_code(d.test)}", ""]
            if d.files:
                out += [" · ".join(f"[{_md(label)}]({path})" for label, path in d.files.items()), ""]
            out += [
                "| t (s) | Δ (s) | wall (UTC) | source | event | detail |",
                "| ---: | ---: | --- | --- | --- | --- |",
            ]
            prev: float | None = None
            for e in d.events:
                delta = "" if prev is None else f"+{e.t - prev:.2f}"
                prev = e.t
                out.append(f"| {e.t:.2f} | {delta} | {_clock(e.wall)} | {e.source} | {_md(e.kind)} | {_md(e.text)} |")
            out.append("")
        return "\n".join(out)

    # --- HTML --------------------------------------------------------------------------------------------------

    def render_html(self) -> str:
        e = html.escape
        counts = ", ".join(f'<span class="{k}">{n} {k}</span>' for k, n in self.counts().items()) or "no tests"
        meta = [("started", _iso(self.started))]
        if self.finished:
            meta.append(("finished", f"{_iso(self.finished)} ({self.finished - self.started:.1f} s)"))
        meta += list(self.meta.items())
        parts = [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{e(self.title)}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{e(self.title)}</h1>",
            "<table class=meta>",
            *(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in meta),
            f"<tr><th>result</th><td>{counts}</td></tr>",
            "</table>",
            "<h2>Tests</h2>",
            "<table><tr><th>test</th><th>outcome</th><th>duration</th><th>devices</th><th>note</th></tr>",
        ]
        for t in self.tests.values():
            devs = ", ".join(f'<a href="#{e(d.key)}">{e(d.name)}</a>' for d in t.devices)
            note = e(t.message)
            if t.details and t.outcome in ("failed", "error"):
                note += f"<details><summary>details</summary><pre>{e(_clip(t.details))}</pre></details>"
            parts.append(
                f"<tr><td><code>{e(t.nodeid)}</code></td><td class={e(t.outcome)}>{e(t.outcome)}</td>"
                f"<td class=num>{t.duration:.1f} s</td><td>{devs}</td><td>{note}</td></tr>"
            )
        parts.append("</table>")
        summary = self.figure_summary()
        if summary:
            parts += [
                "<h2>Figures</h2>",
                "<table><tr><th>figure</th><th>unit</th><th>count</th><th>min</th><th>median</th><th>max</th></tr>",
                *(
                    f"<tr><td>{e(s.name)}</td><td>{e(s.unit)}</td><td class=num>{s.count}</td>"
                    f"<td class=num>{_num(s.min)}</td><td class=num>{_num(s.median)}</td>"
                    f"<td class=num>{_num(s.max)}</td></tr>"
                    for s in summary
                ),
                "</table>",
            ]
        devices = [d for t in self.tests.values() for d in t.devices]
        if devices:
            parts.append("<h2>Devices</h2>")
        for d in devices:
            parts += [
                f'<section id="{e(d.key)}"><h3>{e(d.name)} ({e(d.kind)}) in <code>{e(d.test)}</code></h3>',
                "<p>" + " · ".join(f'<a href="{e(p)}">{e(label)}</a>' for label, p in d.files.items()) + "</p>",
                "<table class=timeline><tr><th>t (s)</th><th>Δ (s)</th><th>wall (UTC)</th><th>source</th>"
                "<th>event</th><th>detail</th></tr>",
            ]
            prev: float | None = None
            for ev in d.events:
                delta = "" if prev is None else f"+{ev.t - prev:.2f}"
                prev = ev.t
                parts.append(
                    f"<tr class={e(ev.source)}><td class=num>{ev.t:.2f}</td><td class=num>{delta}</td>"
                    f"<td>{_clock(ev.wall)}</td><td>{e(ev.source)}</td><td>{e(ev.kind)}</td><td>{e(ev.text)}</td></tr>"
                )
            parts.append("</table>")
            log_rel = d.files.get("serial log")
            if log_rel is not None:
                text, cut = _read_tail(self.run_dir / log_rel)
                note = f" (last {_EMBED_LIMIT >> 10} KiB; the whole log is linked above)" if cut else ""
                parts.append(f"<details><summary>serial log{e(note)}</summary><pre>{e(text)}</pre></details>")
            parts.append("</section>")
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"

    def write(self, *, final: bool = False) -> Path:
        """report.md, report.html, report.json (each replaced atomically); returns report.md's path."""
        if final:
            self.finished = datetime.now(UTC).timestamp()
        with self._lock:
            md, page, data = self.render_markdown(), self.render_html(), self.as_json()
        for name, text in (
            ("report.md", md),
            ("report.html", page),
            ("report.json", json.dumps(data, indent=2) + "\n"),
        ):
            tmp = self.run_dir / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.run_dir / name)
        return self.run_dir / "report.md"


def _md(text: str) -> str:
    """Text for a Markdown table cell, shown as it is rather than as markup or HTML (a console line may hold
    anything); intraword underscores and brackets stay as they are, for the raw file's sake."""
    text = re.sub(r"([\\`|])", r"\\\1", text.replace("\n", " "))
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _code(text: str) -> str:
    """A code span in a table cell."""
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in `text`."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _clip(text: str) -> str:
    return text if len(text) <= _DETAILS_LIMIT else "…\n" + text[-_DETAILS_LIMIT:]


def _read_tail(path: Path) -> tuple[str, bool]:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            if size > _EMBED_LIMIT:
                f.seek(size - _EMBED_LIMIT)
            data = f.read()
    except OSError as e:
        return f"(cannot read {path.name}: {e.strerror})", False
    return data.decode("utf-8", "replace"), size > _EMBED_LIMIT


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;max-width:90em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.2em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.passed,.xfailed{color:#1a7f37;font-weight:600}
.failed,.error,.xpassed{color:#cf222e;font-weight:600}
.skipped{color:#9a6700;font-weight:600}
table.meta th{width:10em}
tr.console td{background:#f6f8fa}
tr.scenario td{background:#fff8e6}
pre{background:#f6f8fa;padding:.8em;overflow:auto;max-height:40em;font-size:12px}
section{border-top:2px solid #ddd;margin-top:1.5em}
"""
