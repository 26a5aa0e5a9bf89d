"""The durable report spool (daemon/spool.py): order, bound and drop counting, durability, corruption.

The crash test SIGKILLs a child process that puts and acknowledges reports in a loop, at random instants,
several times over the same file; after each kill the spool must open cleanly and hold exactly what the child
had committed (the child notes each commit in a side file, fsynced, right after it returns).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pitstop.daemon.errors import SpoolError
from pitstop.daemon.spool import KEEP_ASIDE, SCHEMA_VERSION, Spool, open_spool

REPO = Path(__file__).resolve().parent.parent


def payloads(spool: Spool) -> list[tuple[int, bytes]]:
    return [(e.seq, e.payload) for e in spool.peek(10**9)]


def check_invariant(spool: Spool) -> None:
    c = spool.counters()
    seqs = [e.seq for e in spool.peek(10**9)]
    assert c.queued == len(seqs)
    # Rows leave only from the front (ack, reject of the oldest, drops), so what is left is the newest run.
    assert seqs == list(range(c.last_seq - c.queued + 1, c.last_seq + 1))
    assert c.last_seq == c.delivered + c.rejected + c.dropped + c.queued


def test_put_peek_ack_in_order(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db", 100) as spool:
        seqs = [spool.put(f"r{i}".encode()) for i in range(5)]
        assert seqs == [1, 2, 3, 4, 5]
        assert [e.payload for e in spool.peek(2)] == [b"r0", b"r1"]
        assert spool.ack(2) == 2
        assert [e.seq for e in spool.peek(10)] == [3, 4, 5]
        assert spool.ack(2) == 0  # already gone
        assert spool.reject(3) == 1
        c = spool.counters()
        assert (c.queued, c.delivered, c.rejected, c.dropped, c.last_seq) == (2, 2, 1, 0, 5)
        check_invariant(spool)


def test_seqs_never_reused_after_everything_is_acked(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Spool(path, 100) as spool:
        for _ in range(3):
            spool.put(b"x")
        spool.ack(3)
        assert len(spool) == 0
        spool_id = spool.spool_id
    with Spool(path, 100) as spool:
        assert spool.put(b"y") == 4  # AUTOINCREMENT: an acked seq never comes back
        assert spool.spool_id == spool_id
        assert spool.counters().delivered == 3


def test_put_with_a_function_of_the_seq(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db", 100) as spool:
        spool.put(b"first")
        seq = spool.put(lambda s: f"I am {s}".encode())
        assert seq == 2
        assert payloads(spool)[-1] == (2, b"I am 2")

        def broken(s: int) -> bytes:
            raise RuntimeError("encoder failed")

        with pytest.raises(RuntimeError):
            spool.put(broken)
        assert spool.put(b"next") == 3  # the failed put left nothing behind, not even its seq
        check_invariant(spool)


def test_bound_drops_oldest_and_counts_persistently(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Spool(path, 3) as spool:
        for i in range(1, 8):
            spool.put(f"r{i}".encode())
        assert payloads(spool) == [(5, b"r5"), (6, b"r6"), (7, b"r7")]
        assert spool.dropped == 4
        check_invariant(spool)
    with Spool(path, 2) as spool:  # a smaller bound after a configuration change
        spool.put(b"r8")
        assert [s for s, _ in payloads(spool)] == [7, 8]
        assert spool.dropped == 6
        check_invariant(spool)


def test_wal_and_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Spool(path, 10) as spool:
        spool.put(b"x")
        assert spool._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert spool._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        other = sqlite3.connect(path)  # another reader sees the committed row while the spool is open
        assert other.execute("SELECT count(*) FROM reports").fetchone()[0] == 1
        assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        other.close()


def test_memory_spool_and_fallback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SpoolError, match="directory"):
        Spool(blocker / "sub" / "s.db", 10)
    with caplog.at_level(logging.ERROR, "pitstop.daemon.spool"):
        spool = open_spool(blocker / "sub" / "s.db", 10)
    assert spool.path is None
    assert "keeping reports in memory" in caplog.text
    spool.put(b"a")
    assert payloads(spool) == [(1, b"a")]
    spool.close()


def _aside(tmp_path: Path) -> list[Path]:
    return sorted(p for p in tmp_path.iterdir() if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm")))


def test_garbage_file_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(b"this is not SQLite at all " * 200)
    with caplog.at_level(logging.ERROR, "pitstop.daemon.spool"), Spool(path, 10) as spool:
        assert spool.put(b"fresh") == 1
    aside = _aside(tmp_path)
    assert len(aside) == 1
    assert aside[0].read_bytes().startswith(b"this is not SQLite")
    assert "unusable" in caplog.text and "not a database" in caplog.text and aside[0].name in caplog.text


def test_damaged_page_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s.db"
    with Spool(path, 10_000) as spool:
        for i in range(300):
            spool.put(os.urandom(500) + str(i).encode())
    # Checkpointed by the close; now scribble over the middle of the table's pages.
    data = bytearray(path.read_bytes())
    assert len(data) > 16 * 4096
    data[8 * 4096 : 12 * 4096] = b"\xa5" * (4 * 4096)
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, "pitstop.daemon.spool"), Spool(path, 10) as spool:
        assert len(spool) == 0
        spool.put(b"fresh")
        check_invariant(spool)
    assert len(_aside(tmp_path)) == 1
    assert "starting a fresh spool" in caplog.text


def test_unknown_schema_version_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with Spool(path, 10) as spool:
        assert spool.put(b"x") == 1
    assert len(_aside(tmp_path)) == 1


def test_only_the_newest_corrupt_files_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    for i in range(KEEP_ASIDE + 2):
        path.write_bytes(b"garbage %d" % i * 100)
        Spool(path, 10).close()
    aside = _aside(tmp_path)
    assert len(aside) == KEEP_ASIDE
    assert aside[-1].read_bytes().startswith(b"garbage %d" % (KEEP_ASIDE + 1))


def test_corruption_while_running_starts_a_fresh_spool(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s.db"
    with Spool(path, 10_000) as spool:
        for i in range(300):
            spool.put(os.urandom(500) + str(i).encode())
        old_id = spool.spool_id
        # The disk goes bad under the open spool: pages it has not cached now read back as garbage.
        spool._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        spool._conn.execute("PRAGMA shrink_memory")
        with path.open("r+b") as f:
            f.seek(8 * 4096)
            f.write(b"\xa5" * (4 * 4096))
        with caplog.at_level(logging.ERROR, "pitstop.daemon.spool"):
            entries = spool.peek(10**9)
        assert entries == []
        assert spool.spool_id != old_id
        assert spool.put(b"b") == 1
        assert payloads(spool) == [(1, b"b")]
    assert len(_aside(tmp_path)) == 1
    assert "malformed" in caplog.text


# -- SIGKILL at random instants ----------------------------------------------------------------------------

CHILD = r"""
import os, random, sys
from pathlib import Path
from pitstop.daemon.spool import Spool

db, side, max_reports, seed = sys.argv[1:5]
spool = Spool(Path(db), int(max_reports))
rnd = random.Random(int(seed))
fd = os.open(side, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

def note(line):
    os.write(fd, (line + "\n").encode())
    os.fsync(fd)

note("start")
while True:
    r = rnd.random()
    if r < 0.15:
        top = spool.peek(rnd.randint(1, 6))
        if top:
            note(f"ack? {top[-1].seq}")
            spool.ack(top[-1].seq)
            note(f"ack {top[-1].seq}")
    elif r < 0.2:
        top = spool.peek(1)
        if top:
            note(f"rej? {top[0].seq}")
            spool.reject(top[0].seq)
            note(f"rej {top[0].seq}")
    else:
        seq = spool.put(lambda s: b"report %d " % s + b"x" * rnd.randint(0, 3000))
        note(f"put {seq}")
"""


def _side(path: Path) -> tuple[list[int], int, int | None]:
    """Committed puts, the highest completed ack level (acks and rejects of the oldest alike), and the level of
    an ack or reject begun but not known to have completed (the child was killed around it)."""
    puts: list[int] = []
    done = 0
    pending: int | None = None
    for line in path.read_text().splitlines():
        word, _, arg = line.partition(" ")
        if word == "put":
            puts.append(int(arg))
        elif word in ("ack?", "rej?"):
            pending = int(arg)
        elif word in ("ack", "rej"):
            done = max(done, int(arg))
            pending = None
    # A later ack? supersedes an earlier unresolved one: the child only acks seqs it has just peeked, so it
    # could not have seen them had the earlier one gone through (and vice versa).
    return puts, done, pending


@pytest.mark.parametrize("max_reports", [1_000_000, 25], ids=["unbounded", "bounded"])
def test_survives_sigkill_at_random_instants(tmp_path: Path, max_reports: int) -> None:
    db, side = tmp_path / "s.db", tmp_path / "side.log"
    rnd = random.Random(20240611 + max_reports)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    kills = 8
    for round_ in range(kills):
        starts = side.read_text().count("start\n") if side.exists() else 0
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db), str(side), str(max_reports), str(round_)],
            env=env,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        # Let it start and write a while: importing takes ~0.1-0.3 s on these machines.
        deadline = time.monotonic() + 10
        while (
            (side.read_text().count("start\n") if side.exists() else 0) == starts
            and time.monotonic() < deadline
            and child.poll() is None
        ):
            time.sleep(0.01)
        time.sleep(rnd.uniform(0.05, 0.4))
        assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.stderr:
            child.stderr.close()

        puts, done, pending = _side(side)
        with Spool(db, max_reports) as spool:
            assert not _aside(tmp_path), "a SIGKILL must never leave a spool SQLite calls corrupt"
            check_invariant(spool)
            c = spool.counters()
            rows = payloads(spool)
            seqs = [s for s, _ in rows]
            for s, p in rows:  # never a torn row
                assert p.startswith(b"report %d " % s)
            assert puts, "the child committed nothing before it was killed"
            # Every committed put has a seq; at most one more commit went unrecorded (the kill came between).
            assert max(puts) <= c.last_seq <= max(puts) + 1
            # Nothing acknowledged reappears.
            assert all(s > done for s in seqs)
            level = done
            if pending is not None and (not seqs or seqs[0] > pending):
                level = pending  # that ack committed before the kill
            if max_reports >= 1_000_000:
                # Nothing committed is lost: every recorded put above the ack level is still there.
                assert c.dropped == 0
                missing = [p for p in puts if p > level and p not in set(seqs)]
                assert not missing, f"committed reports lost: {missing[:10]}"
            else:
                assert c.queued <= max_reports
                # The bound drops only the oldest: whatever is queued is the newest run, ending at the last put.
                assert not seqs or seqs[-1] == c.last_seq
        # The next child continues on this file, as a restarted daemon would.
    puts, _, _ = _side(side)
    assert len(puts) > kills, f"only {len(puts)} puts over {kills} runs"


def test_the_report_being_sent_is_not_dropped(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db", 3) as spool:
        for _ in range(3):
            spool.put(b"r")
        spool.hold(1)
        spool.put(b"r")
        spool.put(b"r")
        assert [e.seq for e in spool.peek(10)] == [1, 4, 5]
        assert spool.ack(1) == 1
        spool.hold(None)
        spool.put(b"r")
        assert [e.seq for e in spool.peek(10)] == [4, 5, 6]
        c = spool.counters()
        assert (c.delivered, c.dropped, c.last_seq) == (1, 2, 6)
