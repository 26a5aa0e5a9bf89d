"""The durable report spool: health reports wait here, oldest first, until upstream has acknowledged them.

One SQLite file on the data partition, in WAL mode with synchronous=FULL: power can fail at any instant,
and a report the spool has acknowledged (put returned) must still be there after it comes back. FULL syncs
the WAL on every commit; NORMAL would keep the file consistent but could lose the last commits.

- `put(payload)` appends a report and returns its seq. Seqs only grow (AUTOINCREMENT: a deleted seq is never
  handed out again), so a report acknowledged and deleted can never come back under the same number.
- Bounded to `max_reports`: when full, the oldest go in the same transaction that adds the new one, and a
  persistent `dropped` counter counts them. The report being sent (`hold`) is spared: otherwise a report could
  be counted as dropped and still arrive. `delivered` (ack) and `rejected` (reject) are counted the same
  way, so at every commit: last_seq == delivered + rejected + dropped + queued.
- A file SQLite calls corrupt (or of an unknown schema version) is renamed aside and a fresh spool started,
  with the reason logged: losing queued health reports is better than a daemon that cannot start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pitstop.daemon.errors import SpoolError

log = logging.getLogger(__name__)

SPOOL_FILE = "health-spool.sqlite"  # under DaemonConfig.state_dir
SCHEMA_VERSION = 1
KEEP_ASIDE = 2  # corrupt files kept for inspection; older ones are deleted so the data partition cannot fill

_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_COUNTERS = ("delivered", "rejected", "dropped")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS reports (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        created INTEGER NOT NULL,
        payload BLOB NOT NULL
    )""",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value NOT NULL)",
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    created_ns: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class SpoolCounters:
    queued: int  # reports waiting
    last_seq: int  # the seq of the newest report ever put (0: none yet)
    delivered: int  # acknowledged by upstream (ack)
    rejected: int  # refused by upstream for good (reject)
    dropped: int  # pushed out, unsent, by newer reports while the spool was full
    spool_id: str  # a fresh spool (new file, or after corruption) gets a new id: seqs restart under it
    created_ns: int  # when this spool started counting (start time of the cumulative counters)


class _Corrupt(Exception):
    pass


class Spool:
    """Thread-safe (one lock): the reporter calls it from worker threads. `path=None` keeps it in memory
    (the fallback when the data partition is unusable; nothing survives a restart then)."""

    def __init__(self, path: Path | None, max_reports: int) -> None:
        if max_reports < 1:
            raise ValueError(f"max_reports must be at least 1, not {max_reports}")
        self.path = Path(path) if path is not None else None
        self.max_reports = max_reports
        self._lock = threading.Lock()
        self.spool_id = ""  # set by _open: who this spool is, and since when it counts
        self.created_ns = 0
        self._held: int | None = None
        self._conn = self._open_or_reset()

    # -- opening ----------------------------------------------------------------------------------------

    def _open_or_reset(self) -> sqlite3.Connection:
        try:
            return self._open()
        except _Corrupt as e:
            self._set_aside(str(e))
            try:
                return self._open()
            except _Corrupt as e2:
                raise SpoolError(f"{self.path}: fresh spool unusable: {e2}") from e2

    def _open(self) -> sqlite3.Connection:
        where = str(self.path) if self.path is not None else ":memory:"
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise SpoolError(f"{self.path.parent}: cannot create the spool's directory: {e.strerror}") from e
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(where, isolation_level=None, check_same_thread=False, timeout=10.0)
            if self.path is not None:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise SpoolError(f"{self.path}: SQLite refused WAL mode (journal_mode is {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            check = conn.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise _Corrupt(f"quick_check: {'; '.join(str(r[0]) for r in check[:3])}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise _Corrupt(f"schema version {version}, this pitstop knows {SCHEMA_VERSION}")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:  # not executescript: it would commit the open transaction first
                conn.execute(statement)
            conn.executemany("INSERT OR IGNORE INTO meta VALUES (?, 0)", [(c,) for c in _COUNTERS])
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (time.time_ns(),))
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('id', ?)", (uuid.uuid4().hex,))
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            meta = dict(conn.execute("SELECT name, value FROM meta WHERE name IN ('id', 'created')").fetchall())
            conn.execute("COMMIT")
            self.spool_id, self.created_ns = str(meta["id"]), int(meta["created"])
            return conn
        except sqlite3.DatabaseError as e:
            if conn is not None:
                conn.close()
            if _is_corrupt(e):
                raise _Corrupt(str(e)) from e
            raise SpoolError(f"{where}: cannot open the spool: {e}") from e
        except BaseException:
            if conn is not None:
                conn.close()
            raise

    def _set_aside(self, reason: str) -> None:
        """Rename the database (and its WAL and shared-memory files) aside; keep the newest few."""
        if self.path is None:
            raise SpoolError(f"in-memory spool corrupt: {reason}")
        now = time.time_ns()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 10**9)) + f".{now % 10**9:09d}"
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
        log.error(
            "health spool %s is unusable (%s): moved aside to %s, starting a fresh spool; the reports it held are lost",
            self.path,
            reason,
            aside.name,
        )
        olds = sorted(self.path.parent.glob(f"{self.path.name}.corrupt-*"))  # the stamp sorts by time
        bases = [p for p in olds if not p.name.endswith(("-wal", "-shm"))]
        for old in bases[:-KEEP_ASIDE]:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{old}{suffix}")

    def _reset(self, reason: str) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()
        self._set_aside(reason)
        self._conn = self._open_or_reset()

    # -- operations -------------------------------------------------------------------------------------

    def _run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run `op` in one IMMEDIATE transaction; on corruption start a fresh spool and run it there."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    return _transaction(self._conn, op)
                except sqlite3.DatabaseError as e:
                    if not _is_corrupt(e) or attempt == 2:
                        raise SpoolError(f"{self.path or ':memory:'}: {e}") from e
                    self._reset(str(e))
            raise AssertionError("unreachable")

    def put(self, payload: bytes | Callable[[int], bytes]) -> int:
        """Append one report and return its seq. `payload` may be a function of the seq the report gets,
        so a report can carry its own number. When the spool is full the oldest reports are dropped."""

        def op(c: sqlite3.Connection) -> int:
            seq = _last_seq(c) + 1
            data = payload(seq) if callable(payload) else payload
            c.execute(
                "INSERT INTO reports (seq, created, payload) VALUES (?, ?, ?)",
                (seq, time.time_ns(), sqlite3.Binary(data)),
            )
            excess = c.execute("SELECT count(*) FROM reports").fetchone()[0] - self.max_reports
            if excess > 0:
                held = -1 if self._held is None else self._held
                n = c.execute(
                    "DELETE FROM reports WHERE seq IN (SELECT seq FROM reports WHERE seq != ? ORDER BY seq LIMIT ?)",
                    (held, excess),
                ).rowcount
                c.execute("UPDATE meta SET value = value + ? WHERE name = 'dropped'", (n,))
            return seq

        return self._run(op)

    def hold(self, seq: int | None) -> None:
        """Spare report `seq` from the bound while it is being sent (None: release). Not persistent: after a
        restart nothing is in flight."""
        with self._lock:
            self._held = seq

    def peek(self, n: int = 1) -> list[Entry]:
        """The oldest `n` reports, oldest first."""
        rows = self._run(
            lambda c: c.execute("SELECT seq, created, payload FROM reports ORDER BY seq LIMIT ?", (n,)).fetchall()
        )
        return [Entry(int(s), int(t), bytes(p)) for s, t, p in rows]

    def ack(self, up_to_seq: int) -> int:
        """Delete every report up to and including `up_to_seq` as delivered; returns how many."""
        return self._run(lambda c: _delete(c, "seq <= ?", up_to_seq, "delivered"))

    def reject(self, seq: int) -> int:
        """Delete report `seq` as refused for good by upstream; returns how many (0 or 1)."""
        return self._run(lambda c: _delete(c, "seq = ?", seq, "rejected"))

    def counters(self) -> SpoolCounters:
        def op(c: sqlite3.Connection) -> SpoolCounters:
            meta = dict(c.execute("SELECT name, value FROM meta").fetchall())
            return SpoolCounters(
                queued=c.execute("SELECT count(*) FROM reports").fetchone()[0],
                last_seq=_last_seq(c),
                delivered=int(meta["delivered"]),
                rejected=int(meta["rejected"]),
                dropped=int(meta["dropped"]),
                spool_id=str(meta["id"]),
                created_ns=int(meta["created"]),
            )

        return self._run(op)

    def __len__(self) -> int:
        return int(self._run(lambda c: c.execute("SELECT count(*) FROM reports").fetchone()[0]))

    @property
    def dropped(self) -> int:
        return self.counters().dropped

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_spool(path: Path, max_reports: int) -> Spool:
    """The spool at `path`, or an in-memory one (logged) when the data partition cannot hold it: health
    reporting goes on, without durability."""
    try:
        return Spool(path, max_reports)
    except SpoolError as e:
        log.error("health spool unavailable, keeping reports in memory until restart: %s", e)
        return Spool(None, max_reports)


def _transaction(c: sqlite3.Connection, op: Callable[[sqlite3.Connection], T]) -> T:
    c.execute("BEGIN IMMEDIATE")
    try:
        result = op(c)
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            c.execute("ROLLBACK")
        raise
    c.execute("COMMIT")
    return result


def _last_seq(c: sqlite3.Connection) -> int:
    row = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'reports'").fetchone()
    return int(row[0]) if row else 0


def _delete(c: sqlite3.Connection, where: str, seq: int, counter: str) -> int:
    n = c.execute(f"DELETE FROM reports WHERE {where}", (seq,)).rowcount  # noqa: S608 (fixed clauses)
    if n:
        c.execute("UPDATE meta SET value = value + ? WHERE name = ?", (n, counter))
    return int(n)


def _is_corrupt(e: sqlite3.DatabaseError) -> bool:
    code: Any = getattr(e, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    return "malformed" in str(e) or "not a database" in str(e)
