"""Manifest schema rules, pure: names, versions, targets, regions and canonical encoding."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from pitstop.ota import caibx
from pitstop.ota.errors import BundleError, UnsafePathError
from pitstop.ota.manifest import Manifest, Payload, Region, check_relative_path, check_semver, check_target, parse

H = "ab" * 32


def _manifest(**over: object) -> Manifest:
    n = 3
    index = Region(0, caibx.encoded_size(n), H)
    table = Region(index.end, 4 * n, H)
    data = Region(table.end, 1000, H)
    p = Payload("rootfs", "rootfs", "rootfs", 100_000, H, n, "sha256", (16384, 65536, 262144), index, table, data)
    kw: dict[str, object] = {"version": "1.2.3-rc.1+build.5", "security_version": 4, "compatible": "dev-x",
                             "created": datetime(2026, 11, 1, tzinfo=UTC), "payload_area_size": data.end,
                             "payloads": (p,)}
    kw.update(over)
    return Manifest(**kw)  # type: ignore[arg-type]


def test_canonical_roundtrip() -> None:
    m = _manifest()
    raw = m.encode()
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    back = parse(raw)
    assert back == m
    assert back.encode() == raw


@pytest.mark.parametrize("v", ["0.0.0", "1.2.3", "10.20.30-alpha.1", "1.0.0+20261123", "1.0.0-rc.1+b.2"])
def test_semver_ok(v: str) -> None:
    assert check_semver(v) == v


@pytest.mark.parametrize("v", ["1", "1.2", "01.2.3", "1.2.3-", "v1.2.3", "1.2.3.4", "", 3])
def test_semver_bad(v: object) -> None:
    with pytest.raises(BundleError):
        check_semver(v)


@pytest.mark.parametrize("p", ["a", "a/b", "models/det-v2", "x.y/z_1"])
def test_relative_paths_ok(p: str) -> None:
    assert check_relative_path(p, "t") == p


@pytest.mark.parametrize("p", ["", "/a", "a/../b", "..", ".", "a//b", "a/", "a\\b", "a\0b", "x" * 300,
                               "a/" + "y" * 200])
def test_relative_paths_bad(p: str) -> None:
    with pytest.raises(UnsafePathError):
        check_relative_path(p, "t")


def test_rootfs_target_is_a_slot_class() -> None:
    assert check_target("rootfs", "rootfs") == "rootfs"
    with pytest.raises(BundleError):
        check_target("rootfs", "../dev/sda")


def test_layout_must_be_contiguous() -> None:
    m = _manifest()
    d = json.loads(m.encode())
    d["payloads"][0]["table"]["offset"] += 1
    with pytest.raises(BundleError, match=r"contiguous|outside"):
        parse(json.dumps(d).encode())
    d = json.loads(m.encode())
    d["payload_area_size"] += 5
    with pytest.raises(BundleError, match="cover"):
        parse(json.dumps(d).encode())


def test_bad_created_and_compatible() -> None:
    d = json.loads(_manifest().encode())
    d["created"] = "yesterday"
    with pytest.raises(BundleError, match="created"):
        parse(json.dumps(d).encode())
    d = json.loads(_manifest().encode())
    d["compatible"] = "has space"
    with pytest.raises(BundleError, match="compatible"):
        parse(json.dumps(d).encode())


def test_deeply_nested_json_is_refused_cleanly() -> None:
    with pytest.raises(BundleError):
        parse(b"[" * 100_000 + b"]" * 100_000)
