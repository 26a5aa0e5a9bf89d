"""The signed manifest: schema, strict parsing and canonical encoding. Pure code, no I/O.

Unknown fields are kept (in `extra`) so a newer producer's additions survive an older reader;
every field this version knows is type-checked and range-checked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pitstop.ota import caibx
from pitstop.ota.bundle_format import DEFAULT_LIMITS, Limits
from pitstop.ota.errors import BundleError, BundleLimitError, UnsafePathError

MANIFEST_FORMAT = 1
PAYLOAD_TYPES = ("rootfs", "model", "files")
CHUNK_DIGESTS = ("sha256", "sha512-256")
TABLE_ENTRY_SIZE = 4
MODEL_DESCRIPTION_FILE = "model.json"  # written beside an extracted model: not a name for the model itself

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SLOT_CLASS_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_SEMVER_RE = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
)
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
COMPATIBLE_RE = re.compile(r"[\x21-\x7e]{1,128}")
_MAX_TARGET = 255
_MAX_COMPONENT = 128


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise BundleError(f"invalid payload name {name!r}: use letters, digits, '.', '_', '-' (at most 64)")
    return name


def check_semver(version: object) -> str:
    if not isinstance(version, str) or not _SEMVER_RE.fullmatch(version):
        raise BundleError(f"invalid version {version!r}: not a semantic version (MAJOR.MINOR.PATCH)")
    return version


def check_relative_path(path: object, what: str) -> str:
    """A relative POSIX path that stays below its base: no absolute, empty, '.' or '..' components."""
    if not isinstance(path, str) or not path:
        raise UnsafePathError(f"{what} must be a non-empty relative path")
    if "\0" in path or "\\" in path:
        raise UnsafePathError(f"{what} {path!r} contains a NUL or backslash")
    if path.startswith("/"):
        raise UnsafePathError(f"{what} {path!r} is absolute")
    if len(path) > _MAX_TARGET:
        raise UnsafePathError(f"{what} is longer than {_MAX_TARGET} characters")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePathError(f"{what} {path!r} has an empty, '.' or '..' component")
        if len(part) > _MAX_COMPONENT:
            raise UnsafePathError(f"{what} {path!r} has a component longer than {_MAX_COMPONENT}")
    return path


def check_target(ptype: str, target: object) -> str:
    if ptype == "rootfs":
        if not isinstance(target, str) or not _SLOT_CLASS_RE.fullmatch(target):
            raise BundleError(f"invalid rootfs target {target!r}: a slot class name like 'rootfs'")
        return target
    return check_relative_path(target, f"{ptype} target")


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: object) -> datetime:
    if not isinstance(value, str):
        raise BundleError("manifest field 'created' must be a string")
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError as e:
        raise BundleError(f"manifest field 'created' is not an RFC 3339 UTC time: {value!r}") from e


@dataclass(frozen=True)
class Region:
    """A byte range in the payload area, relative to its start."""

    offset: int
    size: int
    sha256: str

    @property
    def end(self) -> int:
        return self.offset + self.size

    def to_json(self) -> dict[str, Any]:
        return {"offset": self.offset, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Payload:
    name: str
    type: str
    target: str
    size: int
    sha256: str
    chunks: int
    chunk_digest: str
    chunking: tuple[int, int, int]
    index: Region
    table: Region
    data: Region
    model: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def region_start(self) -> int:
        return self.index.offset

    @property
    def region_end(self) -> int:
        return self.data.end

    @property
    def model_file(self) -> str | None:
        if self.model is None:
            return None
        name = self.model["file"]
        assert isinstance(name, str)
        return name

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        d.update(
            name=self.name, type=self.type, target=self.target, size=self.size, sha256=self.sha256,
            chunks=self.chunks, chunk_digest=self.chunk_digest, compression="zstd",
            chunking={"min": self.chunking[0], "avg": self.chunking[1], "max": self.chunking[2]},
            index=self.index.to_json(), table=self.table.to_json(), data=self.data.to_json(),
        )
        if self.model is not None:
            d["model"] = self.model
        return d


@dataclass(frozen=True)
class Manifest:
    version: str
    security_version: int
    compatible: str
    created: datetime
    payload_area_size: int
    payloads: tuple[Payload, ...]
    description: str = ""
    hooks: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def payload(self, name: str) -> Payload:
        for p in self.payloads:
            if p.name == name:
                return p
        names = ", ".join(p.name for p in self.payloads) or "none"
        raise BundleError(f"no payload named {name!r} in this bundle (payloads: {names})")

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        d.update(
            format=MANIFEST_FORMAT, version=self.version, security_version=self.security_version,
            compatible=self.compatible, created=format_time(self.created), description=self.description,
            payload_area_size=self.payload_area_size, payloads=[p.to_json() for p in self.payloads],
        )
        if self.hooks:
            d["hooks"] = self.hooks
        return d

    def encode(self) -> bytes:
        """Canonical bytes: sorted keys, no whitespace, UTF-8. These bytes are what gets signed."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# --- parsing -----------------------------------------------------------------------------------------


def _get(d: dict[str, Any], key: str, typ: type, where: str) -> Any:
    if key not in d:
        raise BundleError(f"{where}: missing field {key!r}")
    v = d[key]
    # bool is an int in Python; a JSON true is never a valid count or offset here.
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise BundleError(f"{where}: field {key!r} must be {typ.__name__}")
    return v


def _uint(d: dict[str, Any], key: str, where: str, cap: int) -> int:
    v: int = _get(d, key, int, where)
    if v < 0:
        raise BundleError(f"{where}: field {key!r} is negative")
    if v > cap:
        raise BundleLimitError(f"{where}: field {key!r} = {v} exceeds the cap of {cap}")
    return v


def _hex64(d: dict[str, Any], key: str, where: str) -> str:
    v: str = _get(d, key, str, where)
    if not _HEX64_RE.fullmatch(v):
        raise BundleError(f"{where}: field {key!r} is not a lowercase hex SHA-256")
    return v


def _region(d: dict[str, Any], key: str, where: str, area: int) -> Region:
    r: dict[str, Any] = _get(d, key, dict, where)
    w = f"{where}.{key}"
    region = Region(_uint(r, "offset", w, 2**64 - 1), _uint(r, "size", w, 2**64 - 1), _hex64(r, "sha256", w))
    if region.end > area:
        raise BundleError(f"{w} points outside the payload area ({region.offset}+{region.size} > {area})")
    return region


_PAYLOAD_KEYS = {"name", "type", "target", "size", "sha256", "chunks", "chunk_digest", "compression",
                 "chunking", "index", "table", "data", "model"}
_MANIFEST_KEYS = {"format", "version", "security_version", "compatible", "created", "description",
                  "payload_area_size", "payloads", "hooks"}


def _parse_payload(d: Any, i: int, area: int, limits: Limits) -> Payload:
    if not isinstance(d, dict):
        raise BundleError(f"payload {i}: must be an object")
    name = check_name(d.get("name"))
    where = f"payload {name!r}"
    ptype = _get(d, "type", str, where)
    if ptype not in PAYLOAD_TYPES:
        raise BundleError(f"{where}: unknown payload type {ptype!r} (known: {', '.join(PAYLOAD_TYPES)})")
    target = check_target(ptype, d.get("target"))
    size = _uint(d, "size", where, limits.max_payload_size)
    chunks = _uint(d, "chunks", where, limits.max_chunks)
    digest = _get(d, "chunk_digest", str, where)
    if digest not in CHUNK_DIGESTS:
        raise BundleError(f"{where}: unknown chunk digest {digest!r}")
    if _get(d, "compression", str, where) != "zstd":
        raise BundleError(f"{where}: unknown compression {d['compression']!r}")
    ch: dict[str, Any] = _get(d, "chunking", dict, where)
    cmin = _uint(ch, "min", where + ".chunking", limits.max_chunk_size)
    cavg = _uint(ch, "avg", where + ".chunking", limits.max_chunk_size)
    cmax = _uint(ch, "max", where + ".chunking", limits.max_chunk_size)
    if not 1 <= cmin <= cavg <= cmax:
        raise BundleError(f"{where}: invalid chunk sizes {cmin}/{cavg}/{cmax}")
    index = _region(d, "index", where, area)
    table = _region(d, "table", where, area)
    data = _region(d, "data", where, area)
    if (size == 0) != (chunks == 0) or size > chunks * cmax or chunks > size // cmin + 1:
        raise BundleError(f"{where}: size {size} is inconsistent with {chunks} chunks of {cmin}..{cmax} bytes")
    if index.size != caibx.encoded_size(chunks) or table.size != TABLE_ENTRY_SIZE * chunks:
        raise BundleError(f"{where}: index or table size does not match {chunks} chunks")
    if data.size > chunks * limits.max_compressed_chunk(cmax):
        raise BundleError(f"{where}: compressed data size {data.size} is impossible for {chunks} chunks")
    if table.offset != index.end or data.offset != table.end:
        raise BundleError(f"{where}: index, table and data are not contiguous")
    model = None
    if ptype == "model":
        m: dict[str, Any] = _get(d, "model", dict, where)
        fname = _get(m, "file", str, where + ".model")
        check_relative_path(fname, f"{where} model file")
        if "/" in fname:
            raise UnsafePathError(f"{where}: model file {fname!r} must be a plain file name")
        if fname == MODEL_DESCRIPTION_FILE:
            raise BundleError(f"{where}: a model file may not be named {MODEL_DESCRIPTION_FILE}")
        desc = m.get("description", {})
        if not isinstance(desc, dict):
            raise BundleError(f"{where}: model description must be an object")
        model = m
    extra = {k: v for k, v in d.items() if k not in _PAYLOAD_KEYS}
    return Payload(name, ptype, target, size, _hex64(d, "sha256", where), chunks, digest, (cmin, cavg, cmax),
                   index, table, data, model, extra)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Readers in other languages may keep the first of two equal keys, we the last: refuse both.
    d = dict(pairs)
    if len(d) != len(pairs):
        dup = sorted({k for k, _ in pairs if sum(1 for k2, _ in pairs if k2 == k) > 1})
        raise BundleError(f"manifest repeats the key(s) {', '.join(dup)}")
    return d


def parse(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Manifest:
    """Parse manifest bytes; raise BundleError (or a subclass) if anything is out of place."""
    if len(data) > limits.max_manifest:
        raise BundleLimitError(f"manifest exceeds the cap of {limits.max_manifest} bytes")
    try:
        d = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BundleError(f"manifest is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise BundleError("manifest must be a JSON object")
    where = "manifest"
    fmt = _get(d, "format", int, where)
    if fmt != MANIFEST_FORMAT:
        raise BundleError(f"unsupported manifest format {fmt}")
    version = check_semver(d.get("version"))
    secver = _uint(d, "security_version", where, 2**63 - 1)
    compatible = _get(d, "compatible", str, where)
    if not COMPATIBLE_RE.fullmatch(compatible):
        raise BundleError("manifest: 'compatible' must be 1-128 printable ASCII characters without spaces")
    created = parse_time(d.get("created"))
    description = d.get("description", "")
    if not isinstance(description, str):
        raise BundleError("manifest: 'description' must be a string")
    area = _uint(d, "payload_area_size", where, limits.max_payloads * limits.max_payload_size * 2)
    raw_payloads: list[Any] = _get(d, "payloads", list, where)
    if len(raw_payloads) > limits.max_payloads:
        raise BundleLimitError(f"manifest lists {len(raw_payloads)} payloads, more than the cap of "
                               f"{limits.max_payloads}")
    payloads = tuple(_parse_payload(p, i, area, limits) for i, p in enumerate(raw_payloads))
    names = [p.name for p in payloads]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise BundleError(f"manifest: duplicate payload name(s): {', '.join(dups)}")
    expected = 0
    for p in payloads:
        if p.region_start != expected:
            raise BundleError(f"payload {p.name!r}: starts at {p.region_start}, expected {expected} (gap or overlap)")
        expected = p.region_end
    if expected != area:
        raise BundleError(f"manifest: payloads cover {expected} bytes of a {area}-byte payload area")
    hooks = d.get("hooks", {})
    if not isinstance(hooks, dict):
        raise BundleError("manifest: 'hooks' must be an object")
    extra = {k: v for k, v in d.items() if k not in _MANIFEST_KEYS}
    return Manifest(version, secver, compatible, created, area, payloads, description, hooks, extra)
