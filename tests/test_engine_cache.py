"""The engine cache's rules, on real files: hit, miss, rebuild on mismatch or corruption, never a blind load.

The build and load steps are plain functions here (TensorRT supplies the real ones on a GPU machine,
tests/test_inference_gpu.py); what is under test is the cache: keys, records, hashes, atomic writes.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from pitstop.inference.engine_cache import EngineCache, cache_key
from pitstop.inference.errors import EngineError

FIELDS = {
    "model_sha256": "ab" * 32,
    "tensorrt": "10.13.3",
    "gpu": "NVIDIA H100 80GB HBM3",
    "compute_capability": "9.0",
    "profile": {"x": [[1, 3, 320, 320]] * 3},
    "precision": "fp16",
    "workspace_mib": 1024,
}


class Builder:
    def __init__(self, payload: bytes = b"ENGINE-v1") -> None:
        self.payload = payload
        self.builds = 0
        self.loads: list[bytes] = []

    def build(self) -> bytes:
        self.builds += 1
        return self.payload + b"#" + str(self.builds).encode()

    def load(self, data: bytes) -> bytes:
        if not data.startswith(b"ENGINE"):
            raise EngineError("not an engine")
        self.loads.append(data)
        return data


def test_miss_then_hit(tmp_path: Path) -> None:
    cache, b = EngineCache(tmp_path), Builder()
    engine, first = cache.get_or_build(FIELDS, b.build, b.load)
    assert (first.hit, first.reason, b.builds) == (False, "miss", 1)
    assert first.path.read_bytes() == engine
    again, second = cache.get_or_build(FIELDS, b.build, b.load)
    assert (second.hit, second.reason, b.builds) == (True, "hit", 1)
    assert again == engine
    record = json.loads(first.path.with_suffix(".json").read_text())
    assert record["sha256"] == hashlib.sha256(engine).hexdigest()
    assert record["fields"]["gpu"] == FIELDS["gpu"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("tensorrt", "11.4.0"),
        ("gpu", "NVIDIA L4"),
        ("compute_capability", "8.9"),
        ("precision", "fp32"),
        ("model_sha256", "cd" * 32),
        ("profile", {"x": [[1, 3, 640, 640]] * 3}),
    ],
)
def test_any_key_field_change_is_a_different_engine(tmp_path: Path, field: str, value: object) -> None:
    cache, b = EngineCache(tmp_path), Builder()
    cache.get_or_build(FIELDS, b.build, b.load)
    changed = {**FIELDS, field: value}
    assert cache_key(changed) != cache_key(FIELDS)
    _, outcome = cache.get_or_build(changed, b.build, b.load)
    assert (outcome.hit, b.builds) == (False, 2)


def _entry(cache: EngineCache) -> tuple[Path, Path]:
    return cache.paths(cache_key(FIELDS))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda e, r: e.write_bytes(e.read_bytes()[:-3]), "do not match"),  # truncated engine
        (lambda e, r: e.write_bytes(b"ENGINE-evil" + e.read_bytes()[11:]), "do not match"),  # flipped bytes
        (lambda e, r: r.unlink(), "record missing"),  # crash between engine and record
        (lambda e, r: e.unlink(), "engine file missing"),
        (lambda e, r: r.write_text("{not json"), "record unreadable"),
        (lambda e, r: r.write_text(r.read_text().replace('"9.0"', '"8.7"')), "different compute_capability"),
    ],
)
def test_damaged_entry_is_rebuilt_never_loaded(tmp_path: Path, damage, reason: str) -> None:
    cache, b = EngineCache(tmp_path), Builder()
    cache.get_or_build(FIELDS, b.build, b.load)
    engine, record = _entry(cache)
    damage(engine, record)
    assert reason in (cache.check(cache_key(FIELDS), FIELDS) or "")
    b.loads.clear()
    data, outcome = cache.get_or_build(FIELDS, b.build, b.load)
    assert not outcome.hit and reason in outcome.reason and b.builds == 2
    assert b.loads == [data] and data.endswith(b"#2")  # only the fresh engine was loaded
    assert cache.check(cache_key(FIELDS), FIELDS) is None


def test_engine_the_runtime_refuses_is_rebuilt(tmp_path: Path) -> None:
    # Bytes that hash right but the runtime cannot deserialize (e.g. a TensorRT upgrade in place).
    cache, b = EngineCache(tmp_path), Builder()
    cache.get_or_build(FIELDS, b.build, b.load)
    engine, _ = _entry(cache)
    cache.store(cache_key(FIELDS), FIELDS, b"GARBAGE", 0.1)
    _, outcome = cache.get_or_build(FIELDS, b.build, b.load)
    assert not outcome.hit and "failed to load" in outcome.reason and b.builds == 2
    assert engine.read_bytes().startswith(b"ENGINE")


def test_failed_build_leaves_no_entry(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)

    def fail() -> bytes:
        raise EngineError("TensorRT failed to build an engine")

    with pytest.raises(EngineError):
        cache.get_or_build(FIELDS, fail, bytes)
    engine, record = _entry(cache)
    assert not engine.exists() and not record.exists()
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]  # no temporaries either


def test_concurrent_loops_build_once(tmp_path: Path) -> None:
    b = Builder()
    gate = threading.Barrier(4)
    results: list[bool] = []

    def worker() -> None:
        gate.wait()
        _, outcome = EngineCache(tmp_path).get_or_build(FIELDS, b.build, b.load)
        results.append(outcome.hit)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b.builds == 1 and sorted(results) == [False, True, True, True]
