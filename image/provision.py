"""Factory provisioning: per-device data written into the data partition of an image file or a flashed disk,
without mounting anything, so a production line flashes hundreds of devices from one image and then gives
each its identity.

Written into `/identity/` of the data partition (`/data/identity/` on the device), owner root:

| file | mode | content |
| --- | --- | --- |
| `device-id` | 0644 | the device id, one line |
| `device.key` | 0600 | the device's private key (ECDSA P-256, PKCS#8 PEM), made here |
| `device.pem` | 0644 | its certificate (CN = device id, client authentication), then the factory CA's |
| `factory-ca.pem` | 0644 | the factory CA certificate |
| `upstream.toml` | 0600 | `url`, `token` of the update server; `metrics_url` (health, OTLP/HTTP) if given |
| `hostname` | 0644 | the host name from the recipe's pattern (only with a recipe) |

How: `debugfs -w` on the ext4 filesystem at the data partition's offset (`DISK?offset=BYTES`), in place. Why
not rebuild the partition with `mkfs.ext4 -d`: in place touches a few blocks in seconds, keeps everything
else on the partition (preloaded models, factory state), and works the same on an image file and on a
flashed disk. Before writing, the filesystem must be clean (never mounted, or cleanly unmounted: debugfs does
not replay a journal); after, every file is read back and `e2fsck -fn` must pass.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pitstop.image import blockdev, datafs, ext4
from pitstop.image.disk import find_partition
from pitstop.image.errors import ImageBuildError, ProvisionError
from pitstop.runner import run

DEVICE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_URL_RE = re.compile(r"https?://[^\s\"'\\]+")
DIR = datafs.IDENTITY_DIR


@dataclass(frozen=True)
class FactoryCa:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def load_factory_ca(cert_path: Path, key_path: Path, *, now: datetime | None = None) -> FactoryCa:
    """The factory CA; ProvisionError unless it is a CA certificate valid now and the key is its own."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ProvisionError(f"cannot load the factory CA ({cert_path}, {key_path}): {e}") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
        raise ProvisionError(f"{key_path}: the factory CA key must be ECDSA or Ed25519")
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    if not ca:
        raise ProvisionError(f"{cert_path} is not a CA certificate (basicConstraints CA:TRUE)")
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ProvisionError(f"{key_path} is not the key of {cert_path}")
    now = now or datetime.now(UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ProvisionError(
            f"{cert_path} is not valid now ({cert.not_valid_before_utc:%Y-%m-%d} … {cert.not_valid_after_utc:%Y-%m-%d})"
        )
    return FactoryCa(cert, key)


def check_device_id(device_id: str) -> str:
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise ProvisionError(
            f"device id {device_id!r}: 1-64 letters, digits, '.', '_', '-', starting with a letter or digit"
        )
    return device_id


def issue_device_cert(
    ca: FactoryCa, device_id: str, *, days: int = 7300, now: datetime | None = None
) -> tuple[bytes, bytes]:
    """A new key for the device and its certificate from the factory CA: (key PEM, certificate chain PEM)."""
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    key = ec.generate_private_key(ec.SECP256R1())
    org = ca.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    names = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(org[0].value))] if org else []
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([*names, x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(min(now + timedelta(days=days), ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    algorithm = None if isinstance(ca.key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    cert = builder.sign(ca.key, algorithm)
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise ProvisionError(f"the certificate issued for {device_id} does not verify against the CA: {e}") from None
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca.cert.public_bytes(serialization.Encoding.PEM)
    return key_pem, chain


def identity_files(
    device_id: str,
    ca: FactoryCa,
    *,
    server_url: str,
    token: str,
    hostname: str | None = None,
    days: int = 7300,
    metrics_url: str | None = None,
) -> dict[str, tuple[bytes, int]]:
    """{file name under identity/: (content, mode)} for one device."""
    check_device_id(device_id)
    if not _URL_RE.fullmatch(server_url):
        raise ProvisionError(f"update server URL {server_url!r}: an http:// or https:// URL")
    if metrics_url is not None and not _URL_RE.fullmatch(metrics_url):
        raise ProvisionError(f"metrics URL {metrics_url!r}: an http:// or https:// URL")
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise ProvisionError("the token must be printable, without spaces or line breaks")
    key_pem, chain = issue_device_cert(ca, device_id, days=days)
    files = {
        "device-id": (f"{device_id}\n".encode(), 0o644),
        "device.key": (key_pem, 0o600),
        "device.pem": (chain, 0o644),
        "factory-ca.pem": (ca.cert.public_bytes(serialization.Encoding.PEM), 0o644),
        "upstream.toml": (_upstream(server_url, token, metrics_url), 0o600),
    }
    if hostname is not None:
        files["hostname"] = (f"{hostname}\n".encode(), 0o644)
    return files


def _upstream(server_url: str, token: str, metrics_url: str | None) -> bytes:
    text = f"url = {json.dumps(server_url)}\ntoken = {json.dumps(token)}\n"
    if metrics_url is not None:
        text += f"metrics_url = {json.dumps(metrics_url)}\n"
    return text.encode()


# --- the data partition, in place ---------------------------------------------------------------------------


def data_fs(target: Path) -> str:
    """The data partition of the disk image or disk `target`, as debugfs and e2fsck name it."""
    if target.is_block_device():
        blockdev.check_disk(target)
    elif not target.is_file():
        raise ProvisionError(f"{target} is neither a disk image nor a block device")
    try:
        offset, _size = find_partition(target, datafs.LABEL)
    except ImageBuildError as e:
        raise ProvisionError(e.message) from None
    return f"{target}?offset={offset}"


def _check_clean(fs: str) -> str:
    res = run(["dumpe2fs", "-h", fs], check=False)
    text = res.text
    if res.returncode != 0 or "Filesystem magic number" not in text:
        raise ProvisionError(f"{fs}: the data partition holds no ext4 filesystem")
    state = re.search(r"^Filesystem state:\s+(.*)$", text, re.M)
    features = re.search(r"^Filesystem features:\s+(.*)$", text, re.M)
    if state is None or state[1].strip() != "clean" or (features and "needs_recovery" in features[1].split()):
        raise ProvisionError(
            f"{fs}: the data filesystem is not clean (mounted, or not cleanly unmounted); "
            "provision before first boot, or run e2fsck -fy on it first"
        )
    uuid = re.search(r"^Filesystem UUID:\s+(\S+)", text, re.M)
    return uuid[1] if uuid else ""


def _cat(fs: str, path: str) -> bytes | None:
    """A file's content, None if it does not exist."""
    res = run(["debugfs", "-R", f'cat "{path}"', fs])
    if "File not found by ext2_lookup" in res.stderr.decode("utf-8", "replace"):
        return None
    return res.stdout


def _ls(fs: str, path: str) -> set[str] | None:
    """Names in a directory ("." and ".." left out), None if it does not exist."""
    res = run(["debugfs", "-R", f'ls -p "{path}"', fs])
    if "File not found by ext2_lookup" in res.stderr.decode("utf-8", "replace"):
        return None
    # One line per entry: /inode/mode/uid/gid/name/size/
    names = {ln.split("/")[5] for ln in res.text.splitlines() if ln.count("/") >= 6}
    return names - {".", ".."}


def read_identity(target: Path, name: str = "device-id") -> bytes | None:
    """A file of `/identity/` on the target's data partition, or None."""
    return _cat(data_fs(target), f"/{DIR}/{name}")


def _mode_of(fs: str, path: str) -> int:
    """Permission bits, as debugfs shows them."""
    out = run(["debugfs", "-R", f'stat "{path}"', fs]).text
    m = re.search(r"Mode:\s+(\d+)", out)
    return int(m[1], 8) if m else -1


def provision_device(
    target: Path,
    device_id: str,
    ca: FactoryCa,
    *,
    server_url: str,
    token: str,
    recipe_path: Path | None = None,
    days: int = 7300,
    metrics_url: str | None = None,
    replace: bool = False,
) -> tuple[list[str], str | None]:
    """One device's identity onto `target` (`pitstop image provision`); with `recipe_path`, the target must be
    an image of that recipe and the host name follows its pattern. Returns (files written, host name)."""
    from pitstop.image import partitions, recipe  # noqa: PLC0415 - recipes only when one is given

    hostname = expect = None
    if recipe_path is not None:
        r = recipe.load(recipe_path)
        hostname = recipe.render_hostname(r.system.hostname, device_id)
        expect = partitions.identity_uuid(r.identity, "fs:data")
    files = identity_files(
        device_id, ca, server_url=server_url, token=token, hostname=hostname, days=days, metrics_url=metrics_url
    )
    provision(target, files, replace=replace, expect_fs_uuid=expect)
    return sorted(files), hostname


def provision(
    target: Path, files: Mapping[str, tuple[bytes, int]], *, replace: bool = False, expect_fs_uuid: str | None = None
) -> None:
    """Write `files` into `/identity/` of the data partition of `target`, read them back, check the filesystem.
    ProvisionError if the device is already provisioned (unless `replace`), the partition is not clean or
    not the expected one (`expect_fs_uuid`: the data filesystem UUID of the recipe's images)."""
    fs = data_fs(target)
    uuid = _check_clean(fs)
    if expect_fs_uuid is not None and uuid.lower() != expect_fs_uuid.lower():
        raise ProvisionError(
            f"{target}: its data partition (UUID {uuid}) is not from an image of this recipe (UUID {expect_fs_uuid})"
        )
    existing = _cat(fs, f"/{DIR}/device-id")
    if existing is not None and not replace:
        raise ProvisionError(
            f"{target} is already provisioned as {existing.decode(errors='replace').strip()!r} "
            "(use --replace to give it a new identity)"
        )
    present = _ls(fs, f"/{DIR}")
    with tempfile.TemporaryDirectory(prefix="pitstop-provision-") as tmp:
        cmds = [] if present is not None else [f"mkdir /{DIR}", f"sif /{DIR} mode 040700"]
        cmds.append(f"cd /{DIR}")
        for i, (name, (data, mode)) in enumerate(sorted(files.items())):
            src = Path(tmp) / str(i)
            src.write_bytes(data)
            if present is not None and name in present:
                cmds.append(f'rm "{name}"')
            cmds += [
                f'write "{src}" "{name}"',
                f'sif "{name}" mode 0{0o100000 | mode:o}',
                f'sif "{name}" uid 0',
                f'sif "{name}" gid 0',
            ]
        try:
            ext4.debugfs_script(fs, cmds, what="provisioning")
        except ImageBuildError as e:
            raise ProvisionError(e.message) from None
    for name, (data, mode) in files.items():
        path = f"/{DIR}/{name}"
        if _cat(fs, path) != data or _mode_of(fs, path) != mode:
            raise ProvisionError(f"{target}: {path} did not read back as written")
    try:
        ext4.fsck(fs)
    except ImageBuildError as e:
        raise ProvisionError(f"after provisioning: {e.message}") from None
