"""`pitstop server` against the daemon's own DDI client (pitstop.daemon.ddi.DdiClient) over real HTTP: poll,
attributes, deployment, the artifact downloaded and resumed with Range through ota's HttpSource, feedback,
cancel, maintenance windows, download-only, installedBase; and the artifact endpoint's HTTP semantics."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from bundlekit import Keys, make_bundle, mixed_data, rootfs_payload
from serverkit import TENANT, CuttingProxy, Site, site

from pitstop.daemon.ddi import DdiClient, DdiStatusError
from pitstop.daemon.ddi_model import ConfigMode, Execution, Finished, Handling, MaintenanceWindow, bundle_artifact
from pitstop.ota.http_source import HttpSource
from pitstop.ota.server import deployments
from pitstop.ota.server.records import ActionStatus, RolloutStatus

SMALL_CHUNKS = (4096, 16384, 65536)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("server-bundles")
    out = {}
    for name, version, seed in (("v2", "2.0.0", 2), ("v3", "3.0.0", 3)):
        payload = rootfs_payload(root / f"{name}.img", mixed_data(400_000, seed))
        out[name] = make_bundle(
            root / f"{name}.pitb", [payload], keys, version=version, security_version=2, chunking=SMALL_CHUNKS
        )
    return out


@pytest.fixture
def s(tmp_path: Path, keys: Keys) -> Iterator[Site]:
    with site(tmp_path, keyring=keys.keyring) as st:
        yield st


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_new_device_is_asked_for_its_attributes(s: Site) -> None:
    tok = s.add_device("dev-1")
    with s.client("dev-1", tok) as c:
        base = c.poll()
        assert base.sleep_s == 30
        assert base.config_data_href == f"{s.url}/{TENANT}/controller/v1/dev-1/configData"
        assert (base.deployment_href, base.cancel_href, base.installed_href) == (None, None, None)
        c.put_config_data({"compatible": "pitstop-test", "bundle_version": "1.0.0", "booted_slot": "a", "x": "1"})
        assert c.poll().config_data_href is None
        c.put_config_data({"x": ""}, ConfigMode.REMOVE)
    d = s.device("dev-1")
    assert d.attributes == {"compatible": "pitstop-test", "bundle_version": "1.0.0", "booted_slot": "a"}
    assert (d.version, d.booted_slot) == ("1.0.0", "a")
    assert d.last_seen is not None and d.last_address == "127.0.0.1"


def test_deployment_from_poll_to_success(s: Site, bundles: dict[str, Path]) -> None:
    tok = s.add_device("dev-1")
    dist = s.upload(bundles["v2"])
    made = s.deploy(dist, ["dev-1"])
    with s.client("dev-1", tok) as c:
        base = c.poll()
        assert base.deployment_href is not None and "?c=" in base.deployment_href
        dep = c.deployment(base.deployment_href)
        assert (dep.download, dep.update, dep.maintenance_window) == (Handling.FORCED, Handling.FORCED, None)
        art = bundle_artifact(dep)
        assert (art.filename, art.size, art.sha256) == ("v2.pitb", bundles["v2"].stat().st_size, sha256(bundles["v2"]))
        assert art.sha1 == hashlib.sha1(bundles["v2"].read_bytes()).hexdigest()
        assert dep.chunks[0].part == "os" and dep.chunks[0].version == "2.0.0"
        assert ("compatible", "pitstop-test") in dep.chunks[0].metadata
        c.feedback(dep.action_id, Execution.PROCEEDING, Finished.NONE, details=["installing v2.pitb"])
        c.feedback(dep.action_id, Execution.DOWNLOAD, Finished.NONE, progress=(40, 100), details=["rootfs: 40 %"])
        a = s.action(int(dep.action_id))
        assert (a.status, a.last_execution, a.progress, a.last_message) == (
            ActionStatus.RUNNING,
            "download",
            (40, 100),
            "rootfs: 40 %",
        )
        c.feedback(dep.action_id, Execution.CLOSED, Finished.SUCCESS, details=["version 2.0.0 committed"])
        after = c.poll()
        assert after.deployment_href is None
        assert after.installed_href == f"{s.url}/{TENANT}/controller/v1/dev-1/installedBase/{dep.action_id}"
        assert after.config_data_href is not None  # asked again: the attributes say what now runs
        assert c.installed(after.installed_href).action_id == dep.action_id
        with pytest.raises(DdiStatusError) as e:
            c.feedback(dep.action_id, Execution.CLOSED, Finished.SUCCESS)
        assert e.value.status == 410
    assert s.action(int(dep.action_id)).status is ActionStatus.SUCCESS
    assert s.device("dev-1").version == "2.0.0"
    assert s.rollout(made.rollout.id).status is RolloutStatus.FINISHED
    history = s.store.read(lambda c: deployments.history(c, int(dep.action_id)))
    assert [e.execution for e in history] == ["proceeding", "download", "closed"]


def test_artifact_download_resumes_with_range(s: Site, bundles: dict[str, Path]) -> None:
    """The daemon's HttpSource through a link that drops once mid-file: the rest comes with a Range request."""
    tok = s.add_device("dev-1")
    s.deploy(s.upload(bundles["v2"]), ["dev-1"])
    host, port = s.server.http.address
    size = bundles["v2"].stat().st_size
    with (
        CuttingProxy((host, port), cut_after=size // 2) as proxy,
        DdiClient(proxy.url, TENANT, "dev-1", auth=s.client("dev-1", tok).auth) as c,
    ):
        dep = c.deployment(c.poll().deployment_href or "")
        url, opts = c.artifact_source(bundle_artifact(dep))
        assert url.startswith(proxy.url)
        with HttpSource(url, dataclasses.replace(opts, backoff=0.01)) as src:
            data = bytearray()
            while block := src.read(1 << 16):
                data += block
        assert bytes(data) == bundles["v2"].read_bytes()
        assert proxy.cuts == 1 and src.connections == 2


def _get(s: Site, tok: str, path: str, method: str = "GET", **headers: str) -> requests.Response:
    return requests.request(
        method,
        f"{s.url}/{TENANT}/controller/v1/dev-1/{path}",
        timeout=10,
        headers={"Authorization": f"TargetToken {tok}", **headers},
    )


def test_artifact_http_semantics(s: Site, bundles: dict[str, Path]) -> None:
    tok = s.add_device("dev-1")
    other = s.add_device("dev-2")
    dist = s.upload(bundles["v2"])
    data = bundles["v2"].read_bytes()
    size = len(data)
    path = f"softwaremodules/{dist.id}/artifacts/{dist.filename}"
    assert _get(s, tok, path).status_code == 404  # not assigned to this device yet
    s.deploy(dist, ["dev-1"])
    full = _get(s, tok, path)
    etag = f'"{hashlib.sha1(data).hexdigest()}"'
    assert (full.status_code, full.content, full.headers["ETag"], full.headers["Accept-Ranges"]) == (
        200,
        data,
        etag,
        "bytes",
    )
    head = _get(s, tok, path, "HEAD")
    assert (head.status_code, head.headers["Content-Length"], head.content) == (200, str(size), b"")
    part = _get(s, tok, path, Range="bytes=1000-1999")
    assert (part.status_code, part.content, part.headers["Content-Range"]) == (
        206,
        data[1000:2000],
        f"bytes 1000-1999/{size}",
    )
    assert _get(s, tok, path, Range="bytes=-10").content == data[-10:]
    assert _get(s, tok, path, Range=f"bytes={size - 5}-").content == data[-5:]
    multi = _get(s, tok, path, Range="bytes=0-9,100-109")
    assert multi.status_code == 206 and multi.headers["Content-Type"].startswith("multipart/byteranges; boundary=")
    assert data[0:10] in multi.content and data[100:110] in multi.content
    assert f"Content-Range: bytes 100-109/{size}".encode() in multi.content
    bad = _get(s, tok, path, Range=f"bytes={size}-")
    assert (bad.status_code, bad.headers["Content-Range"]) == (416, f"bytes */{size}")
    assert _get(s, tok, path, Range="bytes=10-19", **{"If-Range": etag}).status_code == 206
    assert _get(s, tok, path, Range="bytes=10-19", **{"If-Range": '"other"'}).status_code == 200
    assert _get(s, tok, path, Range="bytes=oops").status_code == 200
    assert _get(s, tok, path, **{"If-None-Match": etag}).status_code == 304
    md5 = _get(s, tok, path + ".MD5SUM")
    assert md5.text == f"{hashlib.md5(data).hexdigest()}  {dist.filename}\n"
    listing = _get(s, tok, f"softwaremodules/{dist.id}/artifacts").json()
    assert [a["filename"] for a in listing] == [dist.filename]
    assert _get(s, tok, path, "POST").status_code == 405
    assert _get(s, tok, f"softwaremodules/{dist.id}/artifacts/other.pitb").status_code == 404
    stranger = requests.get(
        f"{s.url}/{TENANT}/controller/v1/dev-2/{path}", timeout=10, headers={"Authorization": f"TargetToken {other}"}
    )
    assert stranger.status_code == 404


def test_cancel_confirmed_by_device(s: Site, bundles: dict[str, Path]) -> None:
    tok = s.add_device("dev-1")
    made = s.deploy(s.upload(bundles["v2"]), ["dev-1"])
    action = s.store.read(lambda c: deployments.current_action(c, "dev-1"))
    assert action is not None
    s.store.write(lambda c, now: deployments.cancel_action(c, now, action.id))
    with s.client("dev-1", tok) as c:
        base = c.poll()
        assert base.deployment_href is None and base.cancel_href is not None
        cancel = c.cancel(base.cancel_href)
        assert cancel.stop_id == str(action.id)
        c.cancel_feedback(cancel.action_id, Execution.CLOSED, Finished.SUCCESS, details=["nothing had begun"])
        assert c.poll().cancel_href is None
        with pytest.raises(DdiStatusError) as e:
            c.feedback(str(action.id), Execution.PROCEEDING, Finished.NONE)
        assert e.value.status == 410
    assert s.action(action.id).status is ActionStatus.CANCELED
    assert s.rollout(made.rollout.id).status is RolloutStatus.FINISHED


def test_cancel_rejected_by_device_goes_on(s: Site, bundles: dict[str, Path]) -> None:
    tok = s.add_device("dev-1")
    s.deploy(s.upload(bundles["v2"]), ["dev-1"])
    action = s.store.read(lambda c: deployments.current_action(c, "dev-1"))
    assert action is not None
    s.store.write(lambda c, now: deployments.cancel_action(c, now, action.id))
    with s.client("dev-1", tok) as c:
        cancel = c.cancel(c.poll().cancel_href or "")
        c.cancel_feedback(cancel.action_id, Execution.REJECTED, Finished.NONE, details=["the slot is being written"])
        assert c.poll().deployment_href is not None
        c.feedback(str(action.id), Execution.CLOSED, Finished.SUCCESS)
        with pytest.raises(DdiStatusError) as e:
            c.cancel_feedback(cancel.action_id, Execution.CLOSED, Finished.SUCCESS)
        assert e.value.status == 410
    assert s.action(action.id).status is ActionStatus.SUCCESS


def test_newer_deployment_supersedes_an_open_one(s: Site, bundles: dict[str, Path]) -> None:
    tok = s.add_device("dev-1")
    s.deploy(s.upload(bundles["v2"]), ["dev-1"])
    s.deploy(s.upload(bundles["v3"]), ["dev-1"])
    with s.client("dev-1", tok) as c:
        cancel = c.cancel(c.poll().cancel_href or "")
        assert s.action(int(cancel.stop_id)).distribution_id == 1
        c.cancel_feedback(cancel.action_id, Execution.CLOSED, Finished.SUCCESS)
        dep = c.deployment(c.poll().deployment_href or "")
        assert dep.chunks[0].version == "3.0.0"


def test_maintenance_window(s: Site, bundles: dict[str, Path]) -> None:
    tok = s.add_device("dev-1")
    s.deploy(s.upload(bundles["v2"]), ["dev-1"], window="22:00-04:00")
    clock = {"now": dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)}
    s.server.app.ddi.now = lambda: clock["now"]
    with s.client("dev-1", tok) as c:
        closed_href = c.poll().deployment_href or ""
        dep = c.deployment(closed_href)
        assert (dep.download, dep.update, dep.maintenance_window) == (
            Handling.FORCED,
            Handling.SKIP,
            MaintenanceWindow.UNAVAILABLE,
        )
        clock["now"] = dt.datetime(2026, 11, 23, 23, 30, tzinfo=dt.UTC)
        open_href = c.poll().deployment_href or ""
        assert open_href != closed_href  # the ?c= changes with the window: the device looks again
        dep = c.deployment(open_href)
        assert (dep.update, dep.maintenance_window) == (Handling.FORCED, MaintenanceWindow.AVAILABLE)


def test_download_only_ends_with_downloaded(s: Site, bundles: dict[str, Path]) -> None:
    tok = s.add_device("dev-1")
    s.deploy(s.upload(bundles["v2"]), ["dev-1"], update="skip")
    with s.client("dev-1", tok) as c:
        dep = c.deployment(c.poll().deployment_href or "")
        assert (dep.download, dep.update, dep.maintenance_window) == (Handling.FORCED, Handling.SKIP, None)
        c.feedback(dep.action_id, Execution.DOWNLOADED, Finished.NONE, details=["stored"])
    assert s.action(int(dep.action_id)).status is ActionStatus.SUCCESS


def test_action_history(s: Site, bundles: dict[str, Path]) -> None:
    tok = s.add_device("dev-1")
    s.deploy(s.upload(bundles["v2"]), ["dev-1"])
    with s.client("dev-1", tok) as c:
        href = c.poll().deployment_href or ""
        action = c.deployment(href).action_id
        c.feedback(action, Execution.PROCEEDING, Finished.NONE, details=["one", "two"])
    doc = _get(s, tok, f"deploymentBase/{action}?actionHistory=5").json()
    assert doc["actionHistory"]["status"] == "RUNNING"
    assert [m.split(" ", 1)[1] for m in doc["actionHistory"]["messages"]] == ["proceeding: one", "proceeding: two"]
    assert "actionHistory" not in _get(s, tok, f"deploymentBase/{action}").json()


def test_installed_offline(s: Site, bundles: dict[str, Path]) -> None:
    tok = s.add_device("dev-1")
    dist = s.upload(bundles["v3"])
    with s.client("dev-1", tok) as c:
        c.installed_base(dist.name, "3.0.0")
        installed = c.poll().installed_href
        assert installed is not None
        assert c.installed(installed).chunks[0].version == "3.0.0"
        c.installed_base("something-else", "9.9.9")
    assert s.device("dev-1").version == "9.9.9"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"status": {}}',
        b'{"status": {"execution": "closed"}}',
        b'{"status": {"execution": "flying", "result": {"finished": "none"}}}',
        b'{"status": {"execution": "closed", "result": {"finished": "success", "progress": {"cnt": 5, "of": 2}}}}',
    ],
)
def test_malformed_feedback_is_400(s: Site, bundles: dict[str, Path], body: bytes) -> None:
    tok = s.add_device("dev-1")
    s.deploy(s.upload(bundles["v2"]), ["dev-1"])
    r = requests.post(
        f"{s.url}/{TENANT}/controller/v1/dev-1/deploymentBase/1/feedback",
        data=body,
        timeout=10,
        headers={"Authorization": f"TargetToken {tok}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["errorCode"] == "hawkbit.server.error.rest.body.notReadable"
    assert s.action(1).status is ActionStatus.RUNNING


def test_feedback_on_another_devices_action_is_404(s: Site, bundles: dict[str, Path]) -> None:
    s.add_device("dev-1")
    tok2 = s.add_device("dev-2")
    s.deploy(s.upload(bundles["v2"]), ["dev-1"])
    with s.client("dev-2", tok2) as c:
        for action in ("1", "99"):
            with pytest.raises(DdiStatusError) as e:
                c.feedback(action, Execution.CLOSED, Finished.SUCCESS)
            assert e.value.status == 404
    assert s.action(1).status is ActionStatus.RUNNING


def test_unknown_resources(s: Site) -> None:
    tok = s.add_device("dev-1")
    auth = {"Authorization": f"TargetToken {tok}"}
    base = f"{s.url}/{TENANT}/controller/v1/dev-1"
    assert requests.get(f"{s.url}/other/controller/v1/dev-1", headers=auth, timeout=10).status_code == 404
    assert requests.get(f"{base}/confirmationBase", headers=auth, timeout=10).status_code == 404
    r = requests.post(base, headers=auth, timeout=10)
    assert (r.status_code, r.headers["Allow"]) == (405, "GET")
    assert requests.get(f"{s.url}/healthz", timeout=10).text == "ok\n"
    assert requests.get(f"{s.url}/", timeout=10).status_code == 404
    assert requests.get(f"{s.url}/{TENANT.lower()}/controller/v1/dev-1", headers=auth, timeout=10).ok


def test_body_limits(s: Site) -> None:
    tok = s.add_device("dev-1")
    r = requests.put(
        f"{s.url}/{TENANT}/controller/v1/dev-1/configData",
        data=b"x" * (2 << 20),
        timeout=10,
        headers={"Authorization": f"TargetToken {tok}", "Content-Type": "application/json"},
    )
    assert r.status_code == 413
    bad = requests.put(
        f"{s.url}/{TENANT}/controller/v1/dev-1/configData",
        timeout=10,
        data=json.dumps({"mode": "merge", "data": {"k": 5}}),
        headers={"Authorization": f"TargetToken {tok}", "Content-Type": "application/json"},
    )
    assert bad.status_code == 400


def test_links_follow_the_host_the_device_used(s: Site) -> None:
    tok = s.add_device("dev-1")
    r = requests.get(
        f"{s.url}/{TENANT}/controller/v1/dev-1",
        timeout=10,
        headers={"Authorization": f"TargetToken {tok}", "Host": "update.site.example:8443"},
    )
    href = r.json()["_links"]["configData"]["href"]
    assert urllib.parse.urlsplit(href).netloc == "update.site.example:8443"
