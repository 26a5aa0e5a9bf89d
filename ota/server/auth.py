"""Who may speak for a device: target tokens, the tenant's gateway token, client certificates. Pure code.

Tokens are stored as their SHA-256 (a copy of the database does not hand out the fleet's tokens) and compared
in constant time. hawkBit's rules, with one difference noted:

- `Authorization: TargetToken <t>`: `t` must be the device's own token.
- `Authorization: GatewayToken <t>`: `t` must be the tenant's gateway token; it may speak for any device.
- A TLS client certificate (the server asked for one with `--client-ca`, so it chains to that CA) whose
  common name is the controller id speaks for that device, as hawkBit's reverse-proxy set-up does.
- An unknown controller id: hawkBit creates the target on its first authenticated poll. Here it is refused
  (404 when the credentials are good for the site, 401 otherwise) unless auto-registration is on; then a
  gateway token or certificate registers it, and a target token is adopted as the new device's own (trust on
  first use: meant for a rig or a lab network, see docs/server.md).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum

from pitstop.errors import UsageError

TARGET = "targettoken"
GATEWAY = "gatewaytoken"
MAX_TOKEN = 256
_DUMMY = hashlib.sha256(b"pitstop: no such token").hexdigest()


def generate_token() -> str:
    """A new random token: 128 bits as 32 hex digits (hawkBit's own are 32 characters as well)."""
    return secrets.token_hex(16)


def check_token(token: str) -> str:
    """A token an operator chose: printable, without spaces (it travels in a header and in upstream.toml)."""
    if not 8 <= len(token) <= MAX_TOKEN or any(c.isspace() or not c.isprintable() for c in token):
        raise UsageError(f"a token must be 8 to {MAX_TOKEN} printable characters without spaces")
    return token


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def same(token_hash: str, stored: str | None) -> bool:
    """Constant-time comparison of a presented token's hash with a stored one (None never matches)."""
    return hmac.compare_digest(token_hash, stored if stored is not None else _DUMMY) and stored is not None


@dataclass(frozen=True)
class Credentials:
    scheme: str  # TARGET or GATEWAY
    token_hash: str = ""


def parse_authorization(header: str | None) -> Credentials | None:
    """The credentials of an Authorization header; None when absent or not a token scheme pitstop knows."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    scheme = scheme.lower()
    token = token.strip()
    if scheme not in (TARGET, GATEWAY) or not token or len(token) > MAX_TOKEN:
        return None
    return Credentials(scheme, hash_token(token))


class Outcome(StrEnum):
    ALLOW = "allow"
    REGISTER = "register"  # unknown device, registered now (auto-registration on)
    UNAUTHORIZED = "unauthorized"  # 401
    UNKNOWN = "unknown"  # 404: the credentials are good for the site, the device is not registered


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    adopt_token_hash: str | None = None  # REGISTER with a target token: the new device's token
    how: str = ""  # "target token", "gateway token", "certificate": for the access log


def decide(
    controller_id: str,
    creds: Credentials | None,
    *,
    known: bool,
    device_token_hash: str | None,
    gateway_token_hash: str | None,
    cert_cn: str | None,
    auto_register: bool,
) -> Decision:
    gateway_ok = creds is not None and creds.scheme == GATEWAY and same(creds.token_hash, gateway_token_hash)
    cert_ok = cert_cn is not None and hmac.compare_digest(cert_cn.encode(), controller_id.encode())
    site_ok = gateway_ok or cert_ok
    how = "gateway token" if gateway_ok else "certificate" if cert_ok else ""
    if known:
        if creds is not None and creds.scheme == TARGET and same(creds.token_hash, device_token_hash):
            return Decision(Outcome.ALLOW, how="target token")
        return Decision(Outcome.ALLOW, how=how) if site_ok else Decision(Outcome.UNAUTHORIZED)
    if site_ok:
        return Decision(Outcome.REGISTER, how=how) if auto_register else Decision(Outcome.UNKNOWN)
    if auto_register and creds is not None and creds.scheme == TARGET:
        return Decision(Outcome.REGISTER, adopt_token_hash=creds.token_hash, how="target token (adopted)")
    return Decision(Outcome.UNAUTHORIZED)
