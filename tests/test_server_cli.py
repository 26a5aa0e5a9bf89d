"""`pitstop server …` as users run it: devices, uploads (refused with one line and exit 63, nothing stored),
deployments and their refusals, the checks, and `serve` as a process (clean stop on SIGTERM, one server per
data directory, bad settings refused before anything is served)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from bundlekit import Keys, assert_refused, make_bundle, mixed_data, rootfs_payload, run_cli
from serverkit import ServerProcess

from pitstop.ota.server import auth
from pitstop.ota.server.store import Store


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keys: Keys, other_keys: Keys) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-bundles")
    payload = [rootfs_payload(root / "r.img", mixed_data(60_000, 9))]
    good = make_bundle(root / "good.pitb", payload, keys, version="2.0.0")
    stranger = make_bundle(root / "stranger.pitb", payload, other_keys, version="2.0.0")
    unsigned = make_bundle(root / "unsigned.pitb", payload, None, version="2.0.0")
    other = make_bundle(root / "other.pitb", payload, keys, version="3.0.0", compatible="someone-else")
    data = good.read_bytes()
    truncated = root / "truncated.pitb"
    truncated.write_bytes(data[: len(data) - 100])
    corrupt = root / "corrupt.pitb"
    corrupt.write_bytes(data[:-50] + bytes(b ^ 0xFF for b in data[-50:]))
    junk = root / "notes.txt"
    junk.write_bytes(b"this is not a bundle\n" * 20)
    return {
        "good": good,
        "stranger": stranger,
        "unsigned": unsigned,
        "other": other,
        "truncated": truncated,
        "corrupt": corrupt,
        "junk": junk,
    }


def cli(capsys: pytest.CaptureFixture[str], data: Path, *args: str | os.PathLike[str]):  # type: ignore[no-untyped-def]
    """`pitstop server ARGS --data DATA` in-process."""
    return run_cli(capsys, "server", *args, "--data", data)


def stored(data: Path) -> tuple[int, list[Path]]:
    with Store(data) as st:
        n = st.read(lambda c: c.execute("SELECT count(*) FROM distributions").fetchone()[0])
    return n, sorted(p for p in (data / "artifacts").rglob("*") if p.is_file())


def test_devices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    r = cli(capsys, data, "device", "add", "dev-1", "--group", "lab")
    assert r.rc == 0 and re.fullmatch(r"[0-9a-f]{32}\n", r.out)
    token = r.out.strip()
    assert cli(capsys, data, "device", "add", "dev-2", "--token", "chosen-token-2").out == "chosen-token-2\n"
    assert cli(capsys, data, "device", "add", "gw-3", "--no-token").out == ""
    assert_refused(cli(capsys, data, "device", "add", "dev-1"), 66)
    assert_refused(cli(capsys, data, "device", "add", "_bad"), 2)
    assert_refused(cli(capsys, data, "device", "add", "dev-9", "--token", "short"), 2)
    assert_refused(cli(capsys, data, "device", "add", "dev-9", "--token", "abcdefghij", "--no-token"), 2)
    listed = cli(capsys, data, "device", "list")
    assert listed.out.splitlines()[0].split() == [
        "DEVICE",
        "GROUP",
        "VERSION",
        "SLOT",
        "LAST",
        "SEEN",
        "HEALTH",
        "DEPLOYMENT",
    ]
    assert [ln.split()[:2] for ln in listed.out.splitlines()[1:]] == [["dev-1", "lab"], ["dev-2", "-"], ["gw-3", "-"]]
    assert [d["id"] for d in json.loads(cli(capsys, data, "device", "list", "--group", "lab", "--json").out)] == [
        "dev-1"
    ]
    new = cli(capsys, data, "device", "token", "dev-1").out.strip()
    assert new != token
    with Store(data) as st:
        assert st.read(
            lambda c: c.execute("SELECT token_hash FROM devices WHERE id = 'dev-1'").fetchone()[0]
        ) == auth.hash_token(new)
    assert cli(capsys, data, "device", "group", "dev-2", "lab").rc == 0
    shown = json.loads(cli(capsys, data, "device", "show", "dev-2", "--json").out)
    assert (shown["group"], shown["has_token"], shown["actions"]) == ("lab", True, [])
    assert "device dev-2 (group lab)" in cli(capsys, data, "device", "show", "dev-2").out
    assert cli(capsys, data, "device", "remove", "dev-2").rc == 0
    assert_refused(cli(capsys, data, "device", "remove", "dev-2"), 65)
    assert_refused(cli(capsys, data, "device", "show", "ghost"), 65)
    gw = cli(capsys, data, "gateway-token")
    assert gw.rc == 0 and len(gw.out.strip()) == 32
    assert cli(capsys, data, "gateway-token", "--disable").out == ""


def test_no_data_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = cli(capsys, tmp_path / "nothing", "device", "list")
    assert_refused(r, 62)
    assert "holds no pitstop server data" in r.err


def test_upload(tmp_path: Path, capsys: pytest.CaptureFixture[str], keys: Keys, bundles: dict[str, Path]) -> None:
    data = tmp_path / "data"
    r = cli(capsys, data, "upload", bundles["good"], "--keyring", keys.keyring)
    assert (r.rc, r.out) == (0, "1\n")
    assert "verified against" in r.err and "signed by CN=pitstop dev signing" in r.err
    again = cli(capsys, data, "upload", bundles["good"], "--keyring", keys.keyring)
    assert again.out == "1\n" and "uploaded already" in again.err
    listed = json.loads(cli(capsys, data, "bundles", "--json").out)
    assert [(b["id"], b["version"], b["verified"], b["filename"]) for b in listed] == [(1, "2.0.0", True, "good.pitb")]
    assert stored(data)[0] == 1 and len(stored(data)[1]) == 1


@pytest.mark.parametrize(("name", "why"), [
    ("junk", "not a pitstop bundle"),
    ("stranger", "refused"),
    ("unsigned", "not signed"),
    ("truncated", "truncated"),
    ("corrupt", "refused, not a valid bundle"),
])  # fmt: skip
def test_upload_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keys: Keys, bundles: dict[str, Path], name: str, why: str
) -> None:
    data = tmp_path / "data"
    r = cli(capsys, data, "upload", bundles[name], "--keyring", keys.keyring)
    assert_refused(r, 63)
    assert why in r.err
    assert stored(data) == (0, [])


def test_upload_without_keyring(tmp_path: Path, capsys: pytest.CaptureFixture[str], bundles: dict[str, Path]) -> None:
    data = tmp_path / "data"
    r = cli(capsys, data, "upload", bundles["unsigned"], "--json")
    assert r.rc == 0 and json.loads(r.out)["verified"] is False and "NOT verified" in r.err
    assert_refused(cli(capsys, data, "upload", bundles["junk"]), 63)  # parsed all the same
    assert_refused(cli(capsys, data, "upload", bundles["truncated"]), 63)
    assert_refused(cli(capsys, data, "upload", tmp_path / "missing.pitb"), 4)
    assert stored(data)[0] == 1


def test_the_servers_keyring_applies_to_uploads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keys: Keys, bundles: dict[str, Path]
) -> None:
    data = tmp_path / "data"
    with ServerProcess(data, "--keyring", str(keys.keyring)) as srv:
        assert_refused(cli(capsys, data, "upload", bundles["stranger"]), 63)
        assert cli(capsys, data, "upload", bundles["good"]).rc == 0
        assert srv.stop() == 0


def test_deploy_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keys: Keys, bundles: dict[str, Path]
) -> None:
    data = tmp_path / "data"
    assert cli(capsys, data, "device", "add", "dev-1", "--group", "lab").rc == 0
    assert_refused(cli(capsys, data, "deploy", "1", "--all"), 65)  # nothing uploaded
    assert_refused(cli(capsys, data, "deploy", tmp_path / "nope.pitb", "--all"), 4)
    assert cli(capsys, data, "upload", bundles["good"], "--keyring", keys.keyring).rc == 0
    for args, code in (
        (["--device", "ghost"], 65),
        (["--group", "empty"], 64),
        (["--all", "--waves", "10,50"], 64),
        (["--all", "--waves", "50,10,100"], 64),
        (["--all", "--max-failure", "150%"], 64),
        (["--all", "--advance-at", "0"], 64),
        (["--all", "--percent", "0"], 64),
        (["--all", "--first-wave", "0"], 64),
        (["--all", "--maintenance-window", "25:00-01:00"], 64),
    ):
        assert_refused(cli(capsys, data, "deploy", "2.0.0", *args), code)
    for args in (["--all", "--soft", "--download-only"], [], ["--all", "--group", "lab"]):
        r = cli(capsys, data, "deploy", "2.0.0", *args)
        assert r.rc == 2 and len(r.err.splitlines()) == 1 and ("error: argument" in r.err or "required" in r.err)
    with Store(data) as st:
        assert st.read(lambda c: c.execute("SELECT count(*) FROM rollouts").fetchone()[0]) == 0
        st.write(
            lambda c, _now: c.execute(
                "UPDATE devices SET attributes = ? WHERE id = 'dev-1'", (json.dumps({"compatible": "someone-else"}),)
            )
        )
    r = cli(capsys, data, "deploy", "1", "--device", "dev-1")
    assert_refused(r, 64)
    assert "it is a 'someone-else' device, the bundle is for 'pitstop-test'" in r.err
    # A bundle file is uploaded and deployed in one go; the device made for it takes it.
    ok = cli(capsys, data, "deploy", bundles["other"], "--group", "lab", "--keyring", keys.keyring, "--json")
    assert ok.rc == 0, ok.err
    assert json.loads(ok.out)["waves"] == [["dev-1"]]


def test_deploy_percent_and_rollouts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keys: Keys, bundles: dict[str, Path]
) -> None:
    data = tmp_path / "data"
    for i in range(20):
        assert cli(capsys, data, "device", "add", f"d{i:02d}", "--no-token").rc == 0
    r = cli(
        capsys,
        data,
        "deploy",
        bundles["good"],
        "--all",
        "--percent",
        "25",
        "--waves",
        "20,100",
        "--max-failure",
        "0.1",
        "--maintenance-window",
        "22:00-04:00@Europe/Berlin",
        "--soft",
        "--keyring",
        keys.keyring,
    )
    assert r.rc == 0, r.err
    assert "to 5 devices (all devices, 25%) in 2 waves (1, 4)" in r.out
    doc = json.loads(cli(capsys, data, "rollouts", "--json").out)
    assert len(doc) == 1
    assert (
        doc[0]["id"],
        doc[0]["status"],
        doc[0]["waves"],
        doc[0]["max_failure"],
        doc[0]["download"],
        doc[0]["update"],
        doc[0]["maintenance_window"],
    ) == ("r1", "running", [1, 4], 0.1, "attempt", "attempt", "22:00-04:00@Europe/Berlin")
    table = cli(capsys, data, "rollouts").out
    assert "r1" in table and "running, wave 1/2" in table
    detail = cli(capsys, data, "rollouts", "r1").out
    assert detail.count("  wave 1 ") == 1 and detail.count("  wave 2 ") == 4
    assert_refused(cli(capsys, data, "rollouts", "r9"), 65)
    assert_refused(cli(capsys, data, "resume", "r1"), 66)
    check = cli(capsys, data, "check", "--deep")
    assert check.rc == 0 and check.out.endswith(": OK\n")


def test_check_finds_damage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keys: Keys, bundles: dict[str, Path]
) -> None:
    data = tmp_path / "data"
    assert cli(capsys, data, "upload", bundles["good"], "--keyring", keys.keyring).rc == 0
    (artifact,) = stored(data)[1]
    artifact.write_bytes(artifact.read_bytes()[:-1] + b"\0")
    r = cli(capsys, data, "check", "--deep")
    assert r.rc == 62 and "does not match its name" in r.out
    artifact.unlink()
    assert "is missing" in cli(capsys, data, "check").out


def test_serve_stops_cleanly_and_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    token = cli(capsys, data, "device", "add", "dev-1").out.strip()
    with ServerProcess(data, "--poll-interval", "45s") as srv:
        r = requests.get(
            f"{srv.url}/DEFAULT/controller/v1/dev-1", headers={"Authorization": f"TargetToken {token}"}, timeout=10
        )
        assert r.json()["config"]["polling"]["sleep"] == "00:00:45"
        second = subprocess.run(
            [sys.executable, "-m", "pitstop.cli", "server", "serve", "--data", str(data), "--listen", "127.0.0.1:0"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 61 and "another pitstop server serves" in second.stderr
        assert srv.stop() == 0
    listed = json.loads(cli(capsys, data, "device", "list", "--json").out)
    assert listed[0]["last_seen"] is not None  # the poll time kept in memory was written at the stop


@pytest.mark.parametrize(("args", "code", "text"), [
    (["--listen", "localhost"], 60, "--listen"),
    (["--listen", "127.0.0.1:99999"], 60, "--listen"),
    (["--tls-cert", "cert.pem"], 60, "both"),
    (["--client-ca", "ca.pem"], 60, "mutual TLS"),
    (["--tenant", "a/b"], 60, "--tenant"),
    (["--poll-interval", "2d"], 60, "--poll-interval"),
    (["--poll-interval", "0"], 60, "--poll-interval"),
    (["--public-url", "ftp://x"], 60, "--public-url"),
    (["--keyring", "missing.pem"], 21, "keyring"),
])  # fmt: skip
def test_serve_refuses_bad_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], code: int, text: str
) -> None:
    r = run_cli(capsys, "server", "serve", "--data", tmp_path / "data", *args)
    assert_refused(r, code)
    assert text in r.err


def test_serve_address_in_use(tmp_path: Path) -> None:
    with ServerProcess(tmp_path / "one") as srv:
        port = srv.url.rsplit(":", 1)[1]
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pitstop.cli",
                "server",
                "serve",
                "--data",
                str(tmp_path / "two"),
                "--listen",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 61 and "cannot listen on 127.0.0.1" in r.stderr
        srv.proc.send_signal(signal.SIGINT)
        assert srv.proc.wait(20) == 0
