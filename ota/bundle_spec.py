"""What `pitstop bundle create` is asked to build: from a TOML spec file or from flags.

Every problem is reported before anything is written, naming the file and key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pitstop.ota import bundle_format as fmt
from pitstop.ota.errors import BundleError, SpecError
from pitstop.ota.manifest import MODEL_DESCRIPTION_FILE, PAYLOAD_TYPES, check_name, check_semver, check_target

_TOP_KEYS = {"version", "security_version", "compatible", "description", "chunking", "compression", "payload"}
_PAYLOAD_KEYS = {"name", "type", "source", "target", "description", "description_file"}
_DEFAULT_TARGETS = {"rootfs": "rootfs"}
_TYPE_NAMES: dict[type, str] = {int: "a whole number", str: "a string", dict: "a table", list: "an array"}


def build_time() -> datetime:
    """SOURCE_DATE_EPOCH when set (reproducible builds), else now; whole seconds."""
    sde = os.environ.get("SOURCE_DATE_EPOCH")
    if sde:
        try:
            return datetime.fromtimestamp(int(sde), UTC)
        except ValueError:
            raise SpecError(f"SOURCE_DATE_EPOCH={sde!r} is not a whole number of seconds") from None
    return datetime.now(UTC).replace(microsecond=0)


@dataclass(frozen=True)
class PayloadSpec:
    name: str
    type: str
    source: Path
    target: str
    model_description: dict[str, Any] | None = None


@dataclass(frozen=True)
class BundleSpec:
    version: str
    security_version: int
    compatible: str
    payloads: tuple[PayloadSpec, ...]
    description: str = ""
    chunking: tuple[int, int, int] = (fmt.CHUNK_MIN_DEFAULT, fmt.CHUNK_AVG_DEFAULT, fmt.CHUNK_MAX_DEFAULT)
    zstd_level: int = 3
    created: datetime = field(default_factory=build_time)


def _wrap(where: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except BundleError as e:
        raise SpecError(f"{where}: {e.message}") from None


def check_payload(where: str, name: str, ptype: str, source: Path, target: str | None,
                  description: dict[str, Any] | None = None) -> PayloadSpec:
    _wrap(where, check_name, name)
    if ptype not in PAYLOAD_TYPES:
        raise SpecError(f"{where}: type {ptype!r} is not one of {', '.join(PAYLOAD_TYPES)}")
    if target is None:
        target = _DEFAULT_TARGETS.get(ptype, name)
    _wrap(where, check_target, ptype, target)
    if ptype == "files":
        if not source.is_dir():
            raise SpecError(f"{where}: source {source} is not a directory (files payloads take a directory)")
    elif not source.is_file() and not source.is_block_device():
        raise SpecError(f"{where}: source {source} is not a file")
    if ptype == "model":
        if source.name == MODEL_DESCRIPTION_FILE:
            raise SpecError(f"{where}: a model file may not be named {MODEL_DESCRIPTION_FILE} (extract writes it)")
        if description is None:
            description = {}
    return PayloadSpec(name, ptype, source, target, description)


def default_chunking(payloads: Sequence[PayloadSpec]) -> tuple[int, int, int]:
    """Tuned for file system images when the bundle carries one (fmt.FS_IMAGE_CHUNKING), casync's otherwise."""
    if any(p.type == "rootfs" for p in payloads):
        return fmt.FS_IMAGE_CHUNKING
    return fmt.CHUNK_MIN_DEFAULT, fmt.CHUNK_AVG_DEFAULT, fmt.CHUNK_MAX_DEFAULT


def check_chunking(where: str, cmin: int, cavg: int, cmax: int) -> tuple[int, int, int]:
    if not (64 <= cmin <= cavg <= cmax <= fmt.DEFAULT_LIMITS.max_chunk_size) or cmin * 2 > cavg:
        raise SpecError(
            f"{where}: chunk sizes min/avg/max = {cmin}/{cavg}/{cmax} must satisfy 64 <= min, 2*min <= avg <= max "
            f"<= {fmt.DEFAULT_LIMITS.max_chunk_size}"
        )
    return cmin, cavg, cmax


def check_common(where: str, version: str, security_version: int, compatible: str) -> None:
    _wrap(where, check_semver, version)
    if isinstance(security_version, bool) or not isinstance(security_version, int) or not (
        0 <= security_version < 2**63
    ):
        raise SpecError(f"{where}: security_version must be a whole number >= 0")
    if not isinstance(compatible, str) or not compatible or len(compatible) > 128 or not all(
        0x21 <= ord(c) <= 0x7E for c in compatible
    ):
        raise SpecError(f"{where}: compatible must be 1-128 printable ASCII characters without spaces")


def _typed(where: str, table: dict[str, Any], key: str, typ: type, default: Any = None) -> Any:
    if key not in table:
        if default is None:
            raise SpecError(f"{where}: missing key {key!r}")
        return default
    v = table[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise SpecError(f"{where}: key {key!r} must be {_TYPE_NAMES.get(typ, typ.__name__)}")
    return v


def load_spec(path: Path) -> BundleSpec:
    """Parse a TOML spec; sources are relative to the spec file's directory."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    base = Path(path).parent
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise SpecError(f"{path}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(_TOP_KEYS))})")
    version = _typed(str(path), raw, "version", str)
    secver = _typed(str(path), raw, "security_version", int)
    compatible = _typed(str(path), raw, "compatible", str)
    check_common(str(path), version, secver, compatible)
    ch = _typed(str(path), raw, "chunking", dict, {})
    bad = sorted(set(ch) - {"min", "avg", "max"})
    if bad:
        raise SpecError(f"{path}: [chunking] unknown key(s) {', '.join(bad)} (allowed: min, avg, max)")
    comp = _typed(str(path), raw, "compression", dict, {})
    if set(comp) - {"level"}:
        raise SpecError(f"{path}: [compression] allows only 'level'")
    level = _typed(f"{path}: [compression]", comp, "level", int, 3)
    if not 1 <= level <= 19:
        raise SpecError(f"{path}: [compression] level must be 1..19")
    raw_payloads = raw.get("payload", [])
    if not isinstance(raw_payloads, list) or not raw_payloads:
        raise SpecError(f"{path}: at least one [[payload]] table is required")
    payloads = []
    for i, p in enumerate(raw_payloads):
        where = f"{path}: payload {i + 1}"
        if not isinstance(p, dict):
            raise SpecError(f"{where}: must be a table")
        bad = sorted(set(p) - _PAYLOAD_KEYS)
        if bad:
            raise SpecError(f"{where}: unknown key(s) {', '.join(bad)} (allowed: {', '.join(sorted(_PAYLOAD_KEYS))})")
        ptype = _typed(where, p, "type", str)
        desc: dict[str, Any] | None = None
        if "description" in p or "description_file" in p:
            if ptype != "model":
                raise SpecError(f"{where}: only model payloads take a description")
            desc = _load_description(where, base, p)
        target = p.get("target")
        if target is not None and not isinstance(target, str):
            raise SpecError(f"{where}: key 'target' must be a string")
        payloads.append(check_payload(where, _typed(where, p, "name", str), ptype,
                                      base / _typed(where, p, "source", str), target, desc))
    _check_unique(str(path), payloads)
    dmin, davg, dmax = default_chunking(payloads)
    chunking = check_chunking(
        f"{path}: [chunking]",
        _typed(f"{path}: [chunking]", ch, "min", int, dmin),
        _typed(f"{path}: [chunking]", ch, "avg", int, davg),
        _typed(f"{path}: [chunking]", ch, "max", int, dmax),
    )
    description = _typed(str(path), raw, "description", str, "")
    return BundleSpec(version, secver, compatible, tuple(payloads), description, chunking, level)


def _load_description(where: str, base: Path, p: dict[str, Any]) -> dict[str, Any]:
    if "description" in p and "description_file" in p:
        raise SpecError(f"{where}: give either 'description' or 'description_file', not both")
    if "description" in p:
        d = p["description"]
        if not isinstance(d, dict):
            raise SpecError(f"{where}: 'description' must be a table")
        return d
    f = base / _typed(where, p, "description_file", str)
    try:
        return tomllib.loads(f.read_text())
    except OSError as e:
        raise SpecError(f"{where}: cannot read description_file {f}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{where}: description_file {f} is not valid TOML: {e}") from None


def _check_unique(where: str, payloads: list[PayloadSpec]) -> None:
    names = [p.name for p in payloads]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise SpecError(f"{where}: duplicate payload name(s): {', '.join(dups)}")


def parse_payload_flag(value: str) -> PayloadSpec:
    """TYPE:NAME:SOURCE[:TARGET] from the command line."""
    parts = value.split(":", 3)
    if len(parts) < 3:
        raise SpecError(f"--payload {value!r}: expected TYPE:NAME:SOURCE[:TARGET]")
    target = parts[3] if len(parts) == 4 else None
    return check_payload(f"--payload {value!r}", parts[1], parts[0], Path(parts[2]), target)


def spec_from_flags(version: str, security_version: int, compatible: str, payloads: list[PayloadSpec],
                    description: str = "", chunking: tuple[int, int, int] | None = None,
                    zstd_level: int = 3) -> BundleSpec:
    check_common("flags", version, security_version, compatible)
    if not 1 <= zstd_level <= 19:
        raise SpecError(f"--zstd-level {zstd_level}: must be 1..19")
    if not payloads:
        raise SpecError("give at least one --payload (or a spec file)")
    _check_unique("flags", payloads)
    ch = check_chunking("--chunk-size", *chunking) if chunking else default_chunking(payloads)
    return BundleSpec(version, security_version, compatible, tuple(payloads), description, ch, zstd_level)
