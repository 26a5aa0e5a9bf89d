"""The server's state in one SQLite database under the data directory, plus the artifact files beside it.

    <data>/server.sqlite        devices, bundles, rollouts, actions and their history, health summaries
    <data>/artifacts/ab/ab12…   each uploaded bundle, named by its SHA-256 (artifacts.py)
    <data>/keyring.pem          the keyring uploads are verified against, when one was given

SQLite in WAL mode with synchronous=FULL: every committed write survives a crash or a power cut, and readers
never wait for the writer, so `pitstop server deploy` and the other management commands work on the data
directory while `pitstop server serve` runs. Every write is one transaction (`write`); a failure inside it
leaves nothing behind. The schema carries a version (PRAGMA user_version) and is migrated forward at open; a
database from a newer pitstop is refused rather than misread.

While serving, writes go through one writer thread that commits them in groups: the requests that arrive
while a commit is being synced share the next one, each inside its own savepoint (one failing rolls back
only itself). A device's answer is sent after its write is durable. Poll times are the exception: they are
kept in memory and written every second with the next group (hawkBit's "lazy poll persistence"), so a crash
may forget up to a second of last-seen times and nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from pitstop.ota.server.errors import StoreError

log = logging.getLogger(__name__)

DB_FILE = "server.sqlite"
ARTIFACTS_DIR = "artifacts"
KEYRING_FILE = "keyring.pem"
BUSY_TIMEOUT_S = 30.0
TOUCH_FLUSH_S = 1.0
MAX_BATCH = 256
SLOW_COMMIT_S = 0.05

T = TypeVar("T")
WriteFn = Callable[[sqlite3.Connection, float], T]
ReadFn = Callable[[sqlite3.Connection], T]

_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    grp TEXT,
    token_hash TEXT,
    registered_by TEXT NOT NULL,
    created REAL NOT NULL,
    last_seen REAL,
    last_address TEXT,
    attributes TEXT NOT NULL DEFAULT '{}',
    want_attributes INTEGER NOT NULL DEFAULT 1,
    version TEXT,
    booted_slot TEXT,
    installed_action INTEGER,
    health TEXT,
    health_time REAL,
    health_spool TEXT,
    health_seq INTEGER
);
CREATE INDEX devices_grp ON devices(grp);
CREATE TABLE artifacts (
    sha256 TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    sha1 TEXT NOT NULL,
    md5 TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE distributions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    security_version INTEGER NOT NULL,
    compatible TEXT NOT NULL,
    filename TEXT NOT NULL,
    sha256 TEXT NOT NULL UNIQUE REFERENCES artifacts(sha256),
    description TEXT NOT NULL DEFAULT '',
    signer TEXT,
    verified INTEGER NOT NULL,
    manifest TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    distribution_id INTEGER NOT NULL REFERENCES distributions(id),
    created REAL NOT NULL,
    target TEXT NOT NULL,
    waves TEXT NOT NULL,
    max_failure REAL NOT NULL,
    advance_at REAL NOT NULL,
    download TEXT NOT NULL,
    update_ TEXT NOT NULL,
    window TEXT,
    status TEXT NOT NULL,
    current_wave INTEGER NOT NULL DEFAULT 0,
    checked_from INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    updated REAL NOT NULL
);
CREATE TABLE actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    distribution_id INTEGER NOT NULL REFERENCES distributions(id),
    rollout_id INTEGER REFERENCES rollouts(id),
    wave INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    download TEXT NOT NULL,
    update_ TEXT NOT NULL,
    window TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    finished REAL,
    last_execution TEXT,
    last_message TEXT,
    progress_cnt INTEGER,
    progress_of INTEGER
);
CREATE INDEX actions_device ON actions(device_id, status);
CREATE INDEX actions_rollout ON actions(rollout_id, wave, status);
CREATE TABLE action_status (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    action_id INTEGER NOT NULL REFERENCES actions(id) ON DELETE CASCADE,
    time REAL NOT NULL,
    channel TEXT NOT NULL,
    execution TEXT NOT NULL,
    finished TEXT,
    code INTEGER,
    progress_cnt INTEGER,
    progress_of INTEGER,
    details TEXT NOT NULL
);
CREATE INDEX action_status_action ON action_status(action_id, id);
CREATE TABLE health (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    time REAL NOT NULL,
    received REAL NOT NULL,
    summary TEXT NOT NULL
);
CREATE INDEX health_device ON health(device_id, id);
"""

# MIGRATIONS[i] takes the schema from version i to i + 1; only ever append.
MIGRATIONS: tuple[str, ...] = (_V1,)
SCHEMA_VERSION = len(MIGRATIONS)


def _describe(e: sqlite3.Error) -> str:
    text = str(e)
    if "locked" in text or "busy" in text:
        return f"the database is locked by another process for more than {BUSY_TIMEOUT_S:g} s"
    return text


class Store:
    """The data directory. Management commands use it directly; `serve` starts the writer thread."""

    def __init__(
        self, data_dir: Path, *, create: bool = True, readers: int = 4, clock: Callable[[], float] = time.time
    ) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / DB_FILE
        self.artifacts_dir = self.data_dir / ARTIFACTS_DIR
        self.keyring_path = self.data_dir / KEYRING_FILE
        self.clock = clock
        if not self.path.exists():
            if not create:
                raise StoreError(f"{self.data_dir} holds no pitstop server data ({DB_FILE} is missing)")
            try:
                self.data_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create the data directory {self.data_dir}: {e.strerror}") from None
        try:
            self.artifacts_dir.mkdir(exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot use the data directory {self.data_dir}: {e.strerror}") from None
        self._conn = self._connect()
        self._lock = threading.Lock()  # the write connection, outside the writer thread
        self._migrate()
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all_readers = [self._connect() for _ in range(max(1, readers))]
        for c in self._all_readers:
            self._readers.put(c)
        self._writer: _Writer | None = None
        self._touch_lock = threading.Lock()
        self._touched: dict[str, tuple[float, str | None]] = {}

    # -- connections ------------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot open {self.path}: {_describe(e)}") from None
        return conn

    def _migrate(self) -> None:
        try:
            with self._lock:
                version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.path} has schema version {version}, written by a newer pitstop; this "
                        f"one knows up to {SCHEMA_VERSION} (upgrade pitstop, or use another --data)"
                    )
                if version == SCHEMA_VERSION:
                    return
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    # Read again inside the lock: another process may have migrated meanwhile.
                    version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
                    for i in range(version, SCHEMA_VERSION):
                        for stmt in _statements(MIGRATIONS[i]):
                            self._conn.execute(stmt)
                        log.info("server database %s migrated to schema version %d", self.path, i + 1)
                    self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot open {self.path}: {_describe(e)}") from None

    def now(self) -> float:
        return self.clock()

    # -- transactions -----------------------------------------------------------------------------------

    def read(self, fn: ReadFn[T]) -> T:
        """`fn(conn)` inside one read transaction (a consistent snapshot; never waits for the writer)."""
        with self.reading() as conn:
            return fn(conn)

    def write(self, fn: WriteFn[T]) -> T:
        """`fn(conn, now)` inside one write transaction, durable when this returns; whatever `fn` raises
        rolls its changes back and is raised here."""
        writer = self._writer
        if writer is not None and threading.current_thread() is not writer.thread:
            return writer.submit(fn)
        with self._lock:
            return self._write_now(fn)

    def _write_now(self, fn: WriteFn[T]) -> T:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise StoreError(f"cannot write {self.path}: {_describe(e)}") from None
        try:
            result = fn(self._conn, self.now())
            self._conn.execute("COMMIT")
        except BaseException as e:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise StoreError(f"cannot write {self.path}: {_describe(e)}") from None
            raise
        return result

    # -- serving ----------------------------------------------------------------------------------------

    def start_writer(self) -> None:
        """Group commits from here on (serve): writes from any thread go through one writer thread."""
        if self._writer is None:
            self._writer = _Writer(self)
            self._writer.thread.start()

    def touch(self, device_id: str, address: str | None) -> None:
        """Note a device's poll; written with the next group commit (or at once when not serving)."""
        now = self.now()
        if self._writer is None:
            self.write(lambda c, _now: _flush_touches(c, {device_id: (now, address)}))
            return
        with self._touch_lock:
            self._touched[device_id] = (now, address)

    def flush(self) -> None:
        """Write the poll times kept in memory now (rather than with the next group)."""
        touched = self._take_touched()
        if touched:
            self.write(lambda c, _now: _flush_touches(c, touched))

    def _take_touched(self) -> dict[str, tuple[float, str | None]]:
        with self._touch_lock:
            out, self._touched = self._touched, {}
        return out

    def close(self) -> None:
        """Stop the writer (after the writes already queued, and the poll times kept), close every connection."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop()
        touched = self._take_touched()
        if touched:
            with contextlib.suppress(StoreError), self._lock:
                self._write_now(lambda c, _now: _flush_touches(c, touched))
        for c in [self._conn, *self._all_readers]:
            with contextlib.suppress(sqlite3.Error):
                c.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- checks -----------------------------------------------------------------------------------------

    def quick_check(self) -> None:
        """StoreError when SQLite finds the file damaged (run when the server starts)."""
        rows = self.read(lambda c: c.execute("PRAGMA quick_check").fetchall())
        if [r[0] for r in rows] != ["ok"]:
            raise StoreError(
                f"{self.path} is damaged ({rows[0][0]}); restore it from a backup "
                "(`pitstop server check` lists the problems)"
            )

    def meta(self, key: str) -> str | None:
        row = self.read(lambda c: c.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone())
        return None if row is None else str(row[0])

    @contextlib.contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """A read transaction as a context manager, for several queries on one snapshot."""
        conn = self._readers.get()
        try:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("ROLLBACK")
        except sqlite3.Error as e:
            raise StoreError(f"cannot read {self.path}: {_describe(e)}") from None
        finally:
            self._readers.put(conn)


def set_meta(conn: sqlite3.Connection, key: str, value: str | None) -> None:
    if value is None:
        conn.execute("DELETE FROM meta WHERE key = ?", (key,))
    else:
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


def _flush_touches(conn: sqlite3.Connection, touched: dict[str, tuple[float, str | None]]) -> None:
    conn.executemany(
        "UPDATE devices SET last_seen = max(coalesce(last_seen, 0), ?), last_address = coalesce(?, last_address) "
        "WHERE id = ?",
        [(t, addr, dev) for dev, (t, addr) in touched.items()],
    )


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


class _Stop:
    pass


_STOP = _Stop()
_Item = tuple[WriteFn[Any], "Future[Any]"]


class _Writer:
    """One thread owning the write connection while serving: group commit (see the module docstring)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.queue: queue.SimpleQueue[_Item | _Stop] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._last_flush = time.monotonic()

    def submit(self, fn: WriteFn[T]) -> T:
        fut: Future[T] = Future()
        self.queue.put((fn, fut))
        return fut.result()

    def stop(self) -> None:
        self.queue.put(_STOP)
        self.thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                item = self.queue.get(timeout=TOUCH_FLUSH_S)
            except queue.Empty:
                item = None
            batch: list[_Item] = []
            if isinstance(item, _Stop):
                stopping = True
            elif item is not None:
                batch.append(item)
            while not stopping and len(batch) < MAX_BATCH:
                try:
                    more = self.queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(more, _Stop):
                    stopping = True
                else:
                    batch.append(more)
            touched: dict[str, tuple[float, str | None]] = {}
            if time.monotonic() - self._last_flush >= TOUCH_FLUSH_S:
                touched = self.store._take_touched()
                self._last_flush = time.monotonic()
            if batch or touched:
                t0 = time.monotonic()
                with self.store._lock:
                    self._commit(batch, touched)
                took = time.monotonic() - t0
                if took > SLOW_COMMIT_S:
                    log.warning(
                        "a commit of %d writes took %.0f ms (a slow disk?)", len(batch) + bool(touched), took * 1000
                    )

    def _commit(self, batch: list[_Item], touched: dict[str, tuple[float, str | None]]) -> None:
        conn = self.store._conn
        results: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            err = StoreError(f"cannot write {self.store.path}: {_describe(e)}")
            for _, fut in batch:
                fut.set_exception(err)
            self._keep(touched)
            return
        now = self.store.now()
        try:
            for fn, fut in batch:
                conn.execute("SAVEPOINT op")
                try:
                    result = fn(conn, now)
                except BaseException as e:  # handed to the caller waiting for it
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((fut, None, e))
                else:
                    conn.execute("RELEASE op")
                    results.append((fut, result, None))
            if touched:
                _flush_touches(conn, touched)
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            err = StoreError(f"cannot write {self.store.path}: {_describe(e)}")
            for _, fut in batch:
                fut.set_exception(err)
            self._keep(touched)
            return
        for fut, result, exc in results:
            if exc is None:
                fut.set_result(result)
            elif isinstance(exc, sqlite3.Error):
                fut.set_exception(StoreError(f"cannot write {self.store.path}: {_describe(exc)}"))
            else:
                fut.set_exception(exc)

    def _keep(self, touched: dict[str, tuple[float, str | None]]) -> None:
        """Poll times a failed commit did not write go back for the next one (newer ones win)."""
        with self.store._touch_lock:
            for dev, t in touched.items():
                self.store._touched.setdefault(dev, t)
