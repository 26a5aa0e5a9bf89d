"""Who `pitstop server` lets in: target tokens, the gateway token, unknown devices (refused, or registered when
asked), TLS with a certificate made by openssl, mutual TLS (a client certificate required; its common name
speaks for the device of that id); plus the pure decision table of auth.py."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from httpkit import TlsFiles, make_tls
from serverkit import TENANT, Site, site

from pitstop.daemon.ddi import DdiClient, DdiStatusError
from pitstop.daemon.errors import UpstreamError
from pitstop.ota.server import auth
from pitstop.ota.server.auth import Outcome
from pitstop.ota.server.errors import ServerConfigError


@pytest.fixture
def s(tmp_path: Path) -> Iterator[Site]:
    with site(tmp_path) as st:
        yield st


def refused(call: Callable[[], object]) -> int:
    with pytest.raises(DdiStatusError) as e:
        call()
    return e.value.status


def test_target_tokens(s: Site) -> None:
    tok1 = s.add_device("dev-1")
    tok2 = s.add_device("dev-2")
    assert s.client("dev-1", tok1).poll().sleep_s == 30
    assert refused(s.client("dev-1").poll) == 401  # no Authorization at all
    assert refused(s.client("dev-1", "wrong-token").poll) == 401
    assert refused(s.client("dev-1", tok2).poll) == 401  # another device's token
    assert refused(s.client("dev-1", gateway=tok1).poll) == 401  # a target token is no gateway token
    r = requests.get(f"{s.url}/{TENANT}/controller/v1/dev-1", headers={"Authorization": f"Bearer {tok1}"}, timeout=5)
    assert (r.status_code, r.headers["WWW-Authenticate"]) == (401, 'TargetToken realm="pitstop"')


def test_gateway_token(s: Site) -> None:
    s.add_device("dev-1")
    assert refused(s.client("dev-1", gateway="gw-secret-1").poll) == 401  # none set yet
    s.set_gateway_token("gw-secret-1")
    assert s.client("dev-1", gateway="gw-secret-1").poll().config_data_href is not None
    assert refused(s.client("dev-1", gateway="gw-secret-2").poll) == 401
    s.set_gateway_token(None)
    assert refused(s.client("dev-1", gateway="gw-secret-1").poll) == 401


def test_unknown_device_refused(s: Site) -> None:
    s.set_gateway_token("gw-secret-1")
    assert refused(s.client("ghost", "some-token").poll) == 401
    with pytest.raises(DdiStatusError, match="unknown device 'ghost'") as e:
        s.client("ghost", gateway="gw-secret-1").poll()
    assert e.value.status == 404
    assert refused(s.client("bad id!", gateway="gw-secret-1").poll) == 404


def test_auto_registration(tmp_path: Path) -> None:
    with site(tmp_path, auto_register=True) as s:
        s.set_gateway_token("gw-secret-1")
        assert s.client("gw-dev", gateway="gw-secret-1").poll().config_data_href is not None
        assert s.device("gw-dev").registered_by == "auto"
        assert s.device("gw-dev").token_hash is None
        # A target token from an unknown device becomes its own (trust on first use) ...
        assert s.client("tofu-dev", "first-token").poll() is not None
        assert s.device("tofu-dev").token_hash == auth.hash_token("first-token")
        # ... and from then on only that token works for it.
        assert refused(s.client("tofu-dev", "another-token").poll) == 401
        assert s.client("tofu-dev", "first-token").poll() is not None
        assert refused(s.client("nobody").poll) == 401


@pytest.fixture
def openssl_cert(tmp_path: Path, tool: Callable[[str], str]) -> tuple[Path, Path]:
    """A self-signed server certificate for 127.0.0.1, made by openssl."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            tool("openssl"),
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls_with_openssl_certificate(tmp_path: Path, openssl_cert: tuple[Path, Path]) -> None:
    cert, key = openssl_cert
    with site(tmp_path, tls_cert=cert, tls_key=key) as s:
        assert s.url.startswith("https://")
        tok = s.add_device("dev-1")
        with s.client("dev-1", tok, ca=cert) as c:
            assert c.poll().config_data_href is not None
        with pytest.raises(UpstreamError, match=r"TLS|certificate|SSL"):
            s.client("dev-1", tok).poll()  # the system's CAs do not know this certificate
        plain = s.url.replace("https://", "http://")
        with pytest.raises(UpstreamError):
            DdiClient(plain, TENANT, "dev-1", read_timeout=3).poll()


def test_tls_files_refused(tmp_path: Path, openssl_cert: tuple[Path, Path]) -> None:
    cert, _key = openssl_cert
    with pytest.raises(ServerConfigError, match="TLS"), site(tmp_path, tls_cert=cert, tls_key=cert):
        pass
    with pytest.raises(ServerConfigError, match="both"), site(tmp_path, tls_cert=cert):
        pass


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


def test_mutual_tls(tmp_path: Path, tls: TlsFiles) -> None:
    with site(tmp_path, tls_cert=tls.server_cert, tls_key=tls.server_key, client_ca=tls.ca_cert) as s:
        tok = s.add_device("dev-1")
        cert = {"client_cert": tls.client_cert, "client_key": tls.client_key}
        with pytest.raises(UpstreamError):
            s.client("dev-1", tok, ca=tls.ca_cert).poll()  # no client certificate
        with pytest.raises(UpstreamError):
            s.client("dev-1", tok, ca=tls.ca_cert, client_cert=tls.stranger_cert, client_key=tls.stranger_key).poll()
        assert s.client("dev-1", tok, ca=tls.ca_cert, **cert).poll() is not None
        # The certificate's common name (device-0001) speaks for that device without a token, and only for it.
        s.add_device("device-0001")
        assert s.client("device-0001", ca=tls.ca_cert, **cert).poll() is not None
        assert refused(s.client("dev-1", ca=tls.ca_cert, **cert).poll) == 401


@pytest.mark.parametrize(
    ("known", "creds", "cert", "auto", "outcome"),
    [
        (True, ("targettoken", "dev"), None, False, Outcome.ALLOW),
        (True, ("targettoken", "other"), None, False, Outcome.UNAUTHORIZED),
        (True, ("gatewaytoken", "gw"), None, False, Outcome.ALLOW),
        (True, ("gatewaytoken", "dev"), None, False, Outcome.UNAUTHORIZED),
        (True, None, "d1", False, Outcome.ALLOW),
        (True, None, "d2", False, Outcome.UNAUTHORIZED),
        (True, None, None, True, Outcome.UNAUTHORIZED),
        (False, ("targettoken", "dev"), None, False, Outcome.UNAUTHORIZED),
        (False, ("targettoken", "dev"), None, True, Outcome.REGISTER),
        (False, ("gatewaytoken", "gw"), None, False, Outcome.UNKNOWN),
        (False, ("gatewaytoken", "gw"), None, True, Outcome.REGISTER),
        (False, ("gatewaytoken", "bad"), None, True, Outcome.UNAUTHORIZED),
        (False, None, "d1", False, Outcome.UNKNOWN),
        (False, None, "d1", True, Outcome.REGISTER),
        (False, None, None, True, Outcome.UNAUTHORIZED),
    ],
)
def test_decision_table(
    known: bool, creds: tuple[str, str] | None, cert: str | None, auto: bool, outcome: Outcome
) -> None:
    c = auth.Credentials(creds[0], auth.hash_token(creds[1])) if creds else None
    d = auth.decide(
        "d1",
        c,
        known=known,
        device_token_hash=auth.hash_token("dev") if known else None,
        gateway_token_hash=auth.hash_token("gw"),
        cert_cn=cert,
        auto_register=auto,
    )
    assert d.outcome is outcome
    if outcome is Outcome.REGISTER:
        assert d.adopt_token_hash == (c.token_hash if c and c.scheme == "targettoken" else None)


def test_authorization_header_parsing() -> None:
    assert auth.parse_authorization("TargetToken abc") == auth.Credentials("targettoken", auth.hash_token("abc"))
    assert auth.parse_authorization("gatewaytoken  abc ") == auth.Credentials("gatewaytoken", auth.hash_token("abc"))
    for bad in (None, "", "TargetToken", "TargetToken ", "Bearer abc", "Basic YWJj", "TargetToken " + "x" * 300):
        assert auth.parse_authorization(bad) is None
    assert not auth.same(auth.hash_token("a"), None)
    assert len(auth.generate_token()) == 32


def test_stop_with_idle_connections(tmp_path: Path, tls: TlsFiles) -> None:
    """Devices keep their connections open between polls: a stop closes them at once, TLS or not."""
    for tls_opts in ({}, {"tls_cert": tls.server_cert, "tls_key": tls.server_key}):
        with site(tmp_path / str(len(tls_opts)), **tls_opts) as s:
            tok = s.add_device("dev-1")
            clients = [s.client("dev-1", tok, ca=tls.ca_cert if tls_opts else None) for _ in range(5)]
            for c in clients:
                c.poll()  # each keeps its connection open
            assert s.server.http.connections == 5
            t0 = time.monotonic()
            s.server.stop()
            assert time.monotonic() - t0 < 2
            assert s.server.http.connections == 0


def test_connection_limit(tmp_path: Path) -> None:
    with site(tmp_path, max_connections=2) as s:
        tok = s.add_device("dev-1")
        held = [s.client("dev-1", tok) for _ in range(2)]
        for c in held:
            c.poll()
        r = requests.get(f"{s.url}/healthz", timeout=5)
        assert (r.status_code, r.text) == (503, "too many connections\n")
        held[0].close()
        deadline = time.monotonic() + 5
        while s.server.http.connections > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert requests.get(f"{s.url}/healthz", timeout=5).status_code == 200
