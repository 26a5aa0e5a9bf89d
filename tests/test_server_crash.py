"""`pitstop server` killed (SIGKILL) mid-way: an upload at each durable step and at random moments, the server
during a storm of device feedback. Afterwards the store passes every check (consistency.py), nothing a device
was told is stored is missing, what a crashed upload left is cleared, and the server carries on."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from bundlekit import Keys, make_bundle, mixed_data, rootfs_payload
from serverkit import ServerProcess

from pitstop.ota.server import artifacts, auth, consistency, deployments, devices
from pitstop.ota.server.records import RolloutStatus
from pitstop.ota.server.store import Store

TENANT = "DEFAULT"


@pytest.fixture(scope="module")
def big_bundle(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Path:
    root = tmp_path_factory.mktemp("crash-bundles")
    return make_bundle(
        root / "big.pitb", [rootfs_payload(root / "r.img", mixed_data(16 << 20, 11))], keys, version="2.0.0"
    )


def upload_process(data: Path, bundle: Path, keyring: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pitstop.cli",
            "-q",
            "server",
            "upload",
            str(bundle),
            "--data",
            str(data),
            "--keyring",
            str(keyring),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def leftovers(data: Path) -> list[Path]:
    return sorted(p for p in (data / "artifacts").rglob("*") if p.is_file())


def check(data: Path) -> None:
    with Store(data) as st:
        assert consistency.problems(st, deep=True) == []


@pytest.mark.parametrize("point", ["server.upload.copied", "server.upload.stored"])
def test_upload_killed_at_each_step(tmp_path: Path, keys: Keys, big_bundle: Path, point: str) -> None:
    data = tmp_path / "data"
    Store(data).close()
    proc = upload_process(data, big_bundle, keys.keyring, {"PITSTOP_CRASHPOINT": f"{point}:1"})
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert len(leftovers(data)) == 1  # the temporary copy, or the stored file whose row never came
    check(data)
    with Store(data) as st:
        assert st.read(deployments.list_distributions) == []
        assert artifacts.sweep(st) == leftovers(data) or not leftovers(data)
        assert leftovers(data) == []
    again = upload_process(data, big_bundle, keys.keyring)
    out, err = again.communicate(timeout=120)
    assert (again.returncode, out) == (0, "1\n"), err
    check(data)


def test_upload_killed_at_random_moments(tmp_path: Path, keys: Keys, big_bundle: Path) -> None:
    rng = random.Random(3)
    outcomes = Counter()
    for i in range(6):
        data = tmp_path / f"data-{i}"
        Store(data).close()
        proc = upload_process(data, big_bundle, keys.keyring)
        time.sleep(rng.uniform(0.1, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        check(data)
        with Store(data) as st:
            n = len(st.read(deployments.list_distributions))
            artifacts.sweep(st)
        # Either it made it whole (one bundle, its file) or it left nothing behind once swept.
        assert (n, len(leftovers(data))) in ((0, 0), (1, 1))
        outcomes[n] += 1
        done = upload_process(data, big_bundle, keys.keyring)
        assert done.communicate(timeout=120)[0] == "1\n"
        check(data)
    assert outcomes[0], f"no kill landed inside an upload: {outcomes}"


def _storm(
    url: str,
    tokens: dict[str, str],
    acked: Counter[tuple[int, str]],
    closed: set[int],
    stop: threading.Event,
    rng: random.Random,
) -> None:
    """Devices hammering the server with feedback: each acknowledged POST is counted (action, execution)."""

    def device(dev: str, tok: str) -> None:
        h = {"Authorization": f"TargetToken {tok}", "Content-Type": "application/json"}
        root = f"{url}/{TENANT}/controller/v1/{dev}"
        with requests.Session() as s:
            while not stop.is_set():
                try:
                    links = s.get(root, headers=h, timeout=5).json()["_links"]
                    if "deploymentBase" not in links:
                        time.sleep(0.02)
                        continue
                    action = int(links["deploymentBase"]["href"].split("/deploymentBase/")[1].split("?")[0])
                    for i in range(rng.randint(2, 8)):
                        body = (
                            '{"status": {"execution": "download", "result": {"finished": "none", "progress": '
                            f'{{"cnt": {i}, "of": 10}}}}, "details": ["chunk {i}"]}}}}'
                        )
                        if (
                            s.post(
                                f"{root}/deploymentBase/{action}/feedback", data=body, headers=h, timeout=5
                            ).status_code
                            == 200
                        ):
                            acked[(action, "download")] += 1
                    result = "failure" if rng.random() < 0.1 else "success"
                    body = f'{{"status": {{"execution": "closed", "result": {{"finished": "{result}"}}}}}}'
                    if (
                        s.post(f"{root}/deploymentBase/{action}/feedback", data=body, headers=h, timeout=5).status_code
                        == 200
                    ):
                        acked[(action, "closed")] += 1
                        closed.add(action)
                except (requests.RequestException, ValueError, KeyError):
                    time.sleep(0.05)  # the server is gone (killed): try again until told to stop

    threads = [threading.Thread(target=device, args=item, daemon=True) for item in tokens.items()]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(10)


@pytest.mark.parametrize("seed", [1, 2])
def test_server_killed_during_a_feedback_storm(tmp_path: Path, keys: Keys, seed: int) -> None:
    rng = random.Random(seed)
    data = tmp_path / "data"
    bundle = make_bundle(tmp_path / "b.pitb", [rootfs_payload(tmp_path / "r.img", mixed_data(20_000, seed))], keys)
    with Store(data) as st:
        tokens = {f"dev-{i:02d}": auth.generate_token() for i in range(16)}
        for dev, tok in tokens.items():
            st.write(lambda c, now, d=dev, t=tok: devices.add(c, now, d, group=None, token_hash=auth.hash_token(t)))
        dist = artifacts.upload(st, bundle, keyring=keys.keyring).distribution
        spec = deployments.RolloutSpec(target="all", devices=list(tokens), waves=(25.0, 50.0, 100.0), max_failure=0.5)
        st.write(lambda c, now: deployments.create_rollout(c, now, dist, spec))
    acked: Counter[tuple[int, str]] = Counter()
    closed: set[int] = set()
    for _ in range(3):
        with ServerProcess(data) as srv:
            stop = threading.Event()
            storm = threading.Thread(target=_storm, args=(srv.url, tokens, acked, closed, stop, rng))
            storm.start()
            time.sleep(rng.uniform(0.3, 1.2))
            srv.kill()
            stop.set()
            storm.join(30)
        check(data)
        with Store(data) as st:
            stored = Counter(
                st.read(
                    lambda c: [
                        (r[0], r[1])
                        for r in c.execute(
                            "SELECT action_id, execution FROM action_status WHERE channel = 'deployment'"
                        )
                    ]
                )
            )
            for key, n in acked.items():
                assert stored[key] >= n, f"action {key[0]}: {n} {key[1]} acknowledged, {stored[key]} stored"
            for action in closed:
                assert st.read(lambda c, a=action: deployments.get_action(c, a)).status.final
    assert sum(acked.values()) > 50, acked  # the storm did reach the server between the kills
    # A clean run to the end: the server carries on from what was stored.
    with ServerProcess(data) as srv:
        stop = threading.Event()
        storm = threading.Thread(target=_storm, args=(srv.url, tokens, acked, closed, stop, rng))
        storm.start()
        deadline = time.monotonic() + 60
        with Store(data) as st:
            while st.read(lambda c: deployments.get_rollout(c, 1)).status is RolloutStatus.RUNNING:
                assert time.monotonic() < deadline, "the rollout did not end"
                time.sleep(0.1)
        stop.set()
        storm.join(30)
        assert srv.stop() == 0
    check(data)
