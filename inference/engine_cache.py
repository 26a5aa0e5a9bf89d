"""The engine cache on the data partition: built engines keyed by everything that makes them valid.

A TensorRT engine runs only on the TensorRT version and GPU that built it, with the options it was
built with. The key is a hash of all of them plus the model's SHA-256; the entry is the engine file
and a JSON record beside it holding the key's fields and the engine's own SHA-256. An entry whose
record is missing, unreadable, for another key, or whose engine bytes do not hash to the record is
not loaded: it is rebuilt (and replaced atomically), and the reason is logged.

This module knows nothing of TensorRT: `get_or_build` takes the build and load steps as functions,
so the cache rules are tested on any machine and the TensorRT runtime supplies the real steps.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pitstop.atomic import atomic_write
from pitstop.inference.errors import EngineError

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the record or the key's meaning changes: old entries then miss, never mislead
T = TypeVar("T")


def cache_key(fields: Mapping[str, Any]) -> str:
    canonical = json.dumps({"format": FORMAT, **fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class CacheOutcome:
    """How an engine was obtained, for logs and the loop's figures."""

    key: str
    path: Path
    hit: bool
    reason: str  # "hit", "miss", or why a present entry was rebuilt
    build_s: float  # 0 on a hit
    load_s: float


class EngineCache:
    """A directory of `<key>.engine` + `<key>.json` entries; safe for concurrent builders (flock)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.directory / f"{key}.engine", self.directory / f"{key}.json"

    def check(self, key: str, fields: Mapping[str, Any]) -> str | None:
        """None when the entry for `key` is present and valid; otherwise why it is not."""
        engine, record = self.paths(key)
        if not record.exists() and not engine.exists():
            return "miss"
        try:
            meta = json.loads(record.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return "record missing"
        except (OSError, ValueError) as e:
            return f"record unreadable ({e})"
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            return "record from another cache format"
        want = json.loads(json.dumps(dict(fields), sort_keys=True))
        have = meta.get("fields") or {}
        if have != want:
            diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            return f"built for a different {', '.join(diff) or 'key'}"
        try:
            data = engine.read_bytes()
        except FileNotFoundError:
            return "engine file missing"
        except OSError as e:
            return f"engine unreadable ({e.strerror or e})"
        if len(data) != meta.get("size") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            return "engine bytes do not match their record (corrupt or truncated)"
        return None

    def store(self, key: str, fields: Mapping[str, Any], data: bytes, build_s: float) -> Path:
        engine, record = self.paths(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "key": key,
            "fields": json.loads(json.dumps(dict(fields), sort_keys=True)),
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "build_seconds": round(build_s, 3),
            "built_at": int(time.time()),
        }
        # Engine first, record last: a crash in between leaves a record-less engine, which check()
        # treats as invalid; a record never points at bytes that were not fully written.
        atomic_write(engine, data)
        atomic_write(record, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        return engine

    def discard(self, key: str) -> None:
        for p in self.paths(key):
            p.unlink(missing_ok=True)

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / f".{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a second loop wanting the same engine waits for the first build
            yield
        finally:
            os.close(fd)

    def get_or_build(
        self,
        fields: Mapping[str, Any],
        build: Callable[[], bytes],
        load: Callable[[bytes], T],
    ) -> tuple[T, CacheOutcome]:
        """Load the cached engine for `fields`, or build, store and load a new one.

        `load` must raise EngineError for bytes it cannot deserialize; such an entry is rebuilt once.
        """
        key = cache_key(fields)
        engine_path, _ = self.paths(key)
        with self._locked(key):
            reason = self.check(key, fields)
            if reason is None:
                t0 = time.perf_counter()
                try:
                    obj = load(engine_path.read_bytes())
                except EngineError as e:
                    reason = f"engine failed to load ({e.message})"
                else:
                    outcome = CacheOutcome(key, engine_path, True, "hit", 0.0, time.perf_counter() - t0)
                    log.info("engine cache hit %s (%.3f s to load)", key, outcome.load_s)
                    return obj, outcome
            if reason != "miss":
                log.warning("engine cache entry %s rebuilt: %s", key, reason)
                self.discard(key)
            t0 = time.perf_counter()
            data = build()
            build_s = time.perf_counter() - t0
            self.store(key, fields, data, build_s)
            t1 = time.perf_counter()
            obj = load(data)
            outcome = CacheOutcome(key, engine_path, False, reason, build_s, time.perf_counter() - t1)
            log.info("engine %s built in %.1f s (%s)", key, build_s, reason)
            return obj, outcome
