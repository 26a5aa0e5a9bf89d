"""`pitstop install`, `status`, `mark-good` and `mark-bad` on a file-backed A/B device (tests/devicekit.py),
through the CLI: install, boot, commit, roll back, model and files payloads, and bad input that must leave
the device byte-identical."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bundlekit import (
    CliResult,
    Keys,
    assert_refused,
    make_bundle,
    make_keys,
    mixed_data,
    resign,
    rootfs_payload,
    run_cli,
)
from devicekit import TestDevice as FileDevice
from devicekit import make_device
from test_adversarial import CASES, REFUSALS, _regions

from pitstop.ota import bundle_format as fmt
from pitstop.ota import grubenv, slot_device
from pitstop.ota.bundle_reader import read_preamble
from pitstop.ota.bundle_spec import PayloadSpec
from pitstop.ota.device import Device
from pitstop.ota.slot_device import SlotError
from pitstop.ota.trust import SignatureBlock

# Exit codes (docs/cli.md)
BUNDLE, SIGNATURE, TRUST, TIME, COMPAT, DOWNGRADE, PAYLOAD = 10, 12, 13, 14, 15, 16, 17
BOOTENV, CONFIG, STATE, SLOT = 22, 23, 24, 27
TRIES = 3
SMALL_CHUNKS = (16384, 32768, 65536)


# --- bundles (built once) ------------------------------------------------------------------------------


class Bundles:
    def __init__(self, root: Path, keys: Keys) -> None:
        self.root = root
        self.keys = keys
        self.data: dict[str, bytes] = {}

    def rootfs(self, name: str, version: str, security_version: int, size: int, seed: int,
               extra: list[PayloadSpec] | None = None, **kw: Any) -> Path:
        data = mixed_data(size, seed)
        self.data[name] = data
        payloads = [rootfs_payload(self.root / f"{name}.img", data), *(extra or [])]
        return make_bundle(self.root / f"{name}.pitb", payloads, kw.pop("keys", self.keys), version=version,
                           security_version=security_version, chunking=SMALL_CHUNKS, **kw)

    def model(self, name: str, seed: int) -> PayloadSpec:
        path = self.root / name / "det.onnx"
        path.parent.mkdir()
        path.write_bytes(mixed_data(50_000, seed))
        return PayloadSpec("det", "model", path, "models/det", {"input": "x", "seed": seed})

    def files(self, name: str, text: str) -> PayloadSpec:
        tree = self.root / name
        (tree / "sub").mkdir(parents=True)
        (tree / "app.conf").write_text(text)
        (tree / "sub" / "rules.txt").write_text(text * 3)
        return PayloadSpec("config", "files", tree, "etc/app")

    def trees(self, name: str, version: str, security_version: int, *payloads: PayloadSpec) -> Path:
        return make_bundle(self.root / f"{name}.pitb", list(payloads), self.keys, version=version,
                           security_version=security_version, chunking=SMALL_CHUNKS)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> dict[str, Path]:
    b = Bundles(tmp_path_factory.mktemp("bundles"), keys)
    out = {
        "v2": b.rootfs("v2", "2.0.0", 2, 1_500_000, seed=2),
        "v3": b.rootfs("v3", "3.0.0", 3, 1_200_000, seed=3),
        "low": b.rootfs("low", "1.5.0", 1, 300_000, seed=4),
        "big": b.rootfs("big", "9.0.0", 9, 1_300_000, seed=6),
        "combo": b.rootfs("combo", "5.0.0", 5, 400_000, seed=5, extra=[b.model("combo-model", 11)]),
        "model1": b.trees("model1", "1.0.0", 1, b.model("m1", 8)),
        "model2": b.trees("model2", "1.1.0", 4, b.model("m2", 9)),
        "files1": b.trees("files1", "1.0.0", 1, b.files("f1", "one\n")),
        "files2": b.trees("files2", "1.1.0", 1, b.files("f2", "two\n")),
        # the bundle issue's adversarial shape: rootfs, then files, then model (CASES index payloads by position)
        "good": b.rootfs("good", "2.0.0", 2, 600_000, seed=7, extra=[b.files("gf", "g\n"), b.model("gm", 12)]),
        "foreign": b.rootfs("foreign", "2.0.0", 2, 1000, seed=1, keys=None),  # unsigned
        "incompatible": b.rootfs("incompatible", "2.0.0", 2, 1000, seed=1, compatible="other-device"),
    }
    for name, data in b.data.items():
        (b.root / f"{name}.raw").write_bytes(data)
    return out


def payload_bytes(bundle: Path) -> bytes:
    return bundle.with_suffix(".raw").read_bytes()


def version_id(bundle: Path, payload: str) -> str:
    with open(bundle, "rb") as f:
        m = read_preamble(f).manifest
    p = next(p for p in m.payloads if p.name == payload)
    return f"{m.version}-{p.sha256[:12]}"


# --- the device and its commands -----------------------------------------------------------------------


@pytest.fixture
def dev(tmp_path: Path, keys: Keys) -> FileDevice:
    return make_device(tmp_path / "dev", keys, tries=TRIES)


def install(capsys: Any, dev: FileDevice, bundle: Path, *extra: str) -> CliResult:
    return run_cli(capsys, "-q", "install", "--config", dev.config_path, bundle, *extra)


def installed(capsys: Any, dev: FileDevice, bundle: Path, *extra: str) -> str:
    r = install(capsys, dev, bundle, *extra)
    assert r.rc == 0, r.err
    return r.out


def status(capsys: Any, dev: FileDevice) -> dict[str, Any]:
    r = run_cli(capsys, "status", "--json", "--config", dev.config_path)
    assert r.rc == 0, r.err
    st: dict[str, Any] = json.loads(r.out)
    return st


def slot_view(st: dict[str, Any], name: str) -> dict[str, Any]:
    view: dict[str, Any] = next(s for s in st["slots"] if s["name"] == name)
    return view


def mark_good(capsys: Any, dev: FileDevice) -> CliResult:
    return run_cli(capsys, "mark-good", "--config", dev.config_path)


def mark_bad(capsys: Any, dev: FileDevice, *slot: str) -> CliResult:
    return run_cli(capsys, "mark-bad", *slot, "--config", dev.config_path)


def reconcile(dev: FileDevice) -> None:
    """What the daemon does at start-up: point model/files links at what is in effect for this boot."""
    Device(dev.config()).reconcile_links()


def slot_holds(dev: FileDevice, slot: str, data: bytes) -> bool:
    with open(dev.slot(slot), "rb") as f:
        return f.read(len(data)) == data


def state_json(dev: FileDevice) -> dict[str, Any]:
    st: dict[str, Any] = json.loads((dev.data / "pitstop" / "state.json").read_text())
    return st


# --- install, boot, commit -----------------------------------------------------------------------------


def test_install_activates_new_slot(capsys: Any, dev: FileDevice, bundles: dict[str, Path]) -> None:
    slot_a = dev.slot("a").read_bytes()
    out = installed(capsys, dev, bundles["v2"])
    assert out.strip() == ("installed 2.0.0 (security_version 2) into slot b: reboot to start it; "
                           "`pitstop mark-good` after it proves healthy")
    assert dev.env() == {"ORDER": "b a", "a_OK": "1", "a_TRY": "3", "b_OK": "1", "b_TRY": "3"}
    data = payload_bytes(bundles["v2"])
    assert slot_holds(dev, "b", data)
    assert dev.slot("b").stat().st_size == 8 << 20  # written in place, never truncated
    assert dev.slot("b").read_bytes()[len(data):] == bytes((8 << 20) - len(data))
    assert dev.slot("a").read_bytes() == slot_a
    state = state_json(dev)
    assert state["pending"] == "b" and state["slots"]["b"]["content"] == "installed"
    assert state["slots"]["b"]["bundle"]["version"] == "2.0.0"
    assert state["committed_security_version"] == 0  # recorded only at commit
    records = list((dev.data / "pitstop" / "slots" / "b").iterdir())
    assert len(records) == 1
    assert sorted(p.name for p in records[0].iterdir()) == ["manifest.json", "rootfs.caibx", "signature.json"]
    with open(bundles["v2"], "rb") as f:
        assert (records[0] / "manifest.json").read_bytes() == read_preamble(f).manifest_bytes
    st = status(capsys, dev)
    assert (st["phase"], st["booted"], st["primary"], st["next_boot"], st["pending"]) == (
        "activated", "a", "b", "b", "b")
    assert slot_view(st, "b")["bundle"]["version"] == "2.0.0" and slot_view(st, "b")["tries_left"] == 3
    r = run_cli(capsys, "status", "--config", dev.config_path)
    assert "phase: activated" in r.out and "slot b: installed" in r.out


def test_boot_trial_commit_then_downgrade_refused(capsys: Any, dev: FileDevice, bundles: dict[str, Path]) -> None:
    installed(capsys, dev, bundles["v2"])
    assert dev.reboot() == "b"
    st = status(capsys, dev)
    assert (st["phase"], st["booted"]) == ("trial", "b") and slot_view(st, "b")["tries_left"] == 2
    r = mark_good(capsys, dev)
    assert r.rc == 0 and "committed security_version 2" in r.out
    st = status(capsys, dev)
    assert (st["phase"], st["pending"], st["committed_security_version"]) == ("none", None, 2)
    assert slot_view(st, "b")["content"] == "good" and slot_view(st, "a")["content"] == "good"
    assert dev.env() == {"ORDER": "b a", "a_OK": "1", "a_TRY": "3", "b_OK": "1", "b_TRY": "3"}
    assert all(dev.reboot() == "b" and mark_good(capsys, dev).rc == 0 for _ in range(5))
    before = dev.snapshot()
    r = install(capsys, dev, bundles["low"])
    assert_refused(r, DOWNGRADE)
    assert "security_version" in r.err or "downgrade" in r.err
    assert dev.snapshot() == before
    # the next install goes into a, the old slot, and the floor holds through it
    installed(capsys, dev, bundles["v3"])
    assert dev.env()["ORDER"] == "a b" and slot_holds(dev, "a", payload_bytes(bundles["v3"]))
    assert status(capsys, dev)["committed_security_version"] == 2


def test_rollback_when_new_slot_never_marks_good(capsys: Any, dev: FileDevice, bundles: dict[str, Path]) -> None:
    installed(capsys, dev, bundles["v2"])
    booted = [dev.reboot() for _ in range(TRIES)]
    assert booted == ["b"] * TRIES and status(capsys, dev)["phase"] == "trial"
    assert dev.reboot() == "a"  # tries spent: GRUB falls back
    st = status(capsys, dev)
    assert (st["phase"], st["booted"], st["pending"]) == ("rolled-back", "a", "b")
    assert mark_good(capsys, dev).rc == 0
    env = dev.env()
    assert (env["ORDER"], env["b_OK"], env["b_TRY"], env["a_OK"], env["a_TRY"]) == ("a b", "0", "0", "1", "3")
    st = status(capsys, dev)
    assert (st["phase"], st["pending"], st["committed_security_version"]) == ("none", None, 0)
    assert slot_view(st, "b")["content"] == "bad" and not slot_view(st, "b")["bootable"]
    assert all(dev.reboot() == "a" for _ in range(2 * TRIES))


def test_rollback_after_running_slot_spent_its_tries(capsys: Any, tmp_path: Path, keys: Keys,
                                                     bundles: dict[str, Path]) -> None:
    """tries = 1 and no mark-good on the running slot before the install: the fallback still gets tries,
    so a failing update comes back to it (GRUB's last resort would otherwise pick the new slot forever)."""
    dev = make_device(tmp_path / "dev", keys, tries=1)
    assert dev.reboot() == "a" and dev.env()["a_TRY"] == "0"
    installed(capsys, dev, bundles["v2"])
    assert dev.env()["a_TRY"] == "1"
    assert [dev.reboot() for _ in range(2)] == ["b", "a"]
    assert status(capsys, dev)["phase"] == "rolled-back"


def test_mark_bad_on_trial_boots_old_slot(capsys: Any, dev: FileDevice, bundles: dict[str, Path]) -> None:
    # nothing else bootable yet: marking the only slot bad is refused
    before = dev.snapshot()
    r = mark_bad(capsys, dev)
    assert_refused(r, STATE)
    assert "nothing to boot" in r.err and dev.snapshot() == before
    installed(capsys, dev, bundles["v2"])
    # activated, not booted: dropping the new slot's fallback is refused
    before = dev.snapshot()
    assert_refused(mark_bad(capsys, dev), STATE)
    assert_refused(mark_bad(capsys, dev, "a"), STATE)
    assert dev.snapshot() == before
    assert dev.reboot() == "b"
    assert_refused(mark_bad(capsys, dev, "a"), STATE)  # a is the fallback of the trial
    r = mark_bad(capsys, dev)
    assert r.rc == 0 and "next boot: slot a" in r.out
    env = dev.env()
    assert (env["ORDER"], env["b_OK"], env["b_TRY"]) == ("a b", "0", "0")
    st = status(capsys, dev)
    assert st["pending"] is None and slot_view(st, "b")["content"] == "bad"
    assert dev.reboot() == "a"
    assert status(capsys, dev)["phase"] == "none"
    before = dev.snapshot()
    assert_refused(mark_bad(capsys, dev), STATE)  # a is all there is
    assert_refused(mark_bad(capsys, dev, "c"), STATE)
    assert dev.snapshot() == before


def test_install_while_booted_slot_is_on_trial_refused(capsys: Any, dev: FileDevice,
                                                       bundles: dict[str, Path]) -> None:
    installed(capsys, dev, bundles["v2"])
    assert dev.reboot() == "b"
    before = dev.snapshot()
    r = install(capsys, dev, bundles["v3"])
    assert_refused(r, STATE)
    assert "not committed" in r.err
    assert dev.snapshot() == before


def test_second_install_over_activated_slot(capsys: Any, dev: FileDevice, bundles: dict[str, Path]) -> None:
    slot_a = dev.slot("a").read_bytes()
    installed(capsys, dev, bundles["v2"])
    installed(capsys, dev, bundles["v3"])
    assert slot_holds(dev, "b", payload_bytes(bundles["v3"]))
    assert dev.slot("a").read_bytes() == slot_a
    assert dev.env() == {"ORDER": "b a", "a_OK": "1", "a_TRY": "3", "b_OK": "1", "b_TRY": "3"}
    st = status(capsys, dev)
    assert (st["phase"], st["pending"]) == ("activated", "b")
    assert slot_view(st, "b")["bundle"]["version"] == "3.0.0"
    records = list((dev.data / "pitstop" / "slots" / "b").iterdir())
    assert len(records) == 1  # the older record is gone
    assert dev.reboot() == "b" and mark_good(capsys, dev).rc == 0
    assert status(capsys, dev)["committed_security_version"] == 3


def test_no_activate_then_install_again(capsys: Any, dev: FileDevice, bundles: dict[str, Path]) -> None:
    env = dev.env()
    out = installed(capsys, dev, bundles["v2"], "--no-activate")
    assert "not activated" in out and dev.env() == env
    assert status(capsys, dev)["phase"] == "installed"
    assert dev.reboot() == "a"
    installed(capsys, dev, bundles["v3"])
    assert status(capsys, dev)["phase"] == "activated" and dev.reboot() == "b"


# --- model and files payloads --------------------------------------------------------------------------


def link_of(dev: FileDevice, target: str) -> str | None:
    live = dev.data / target
    if not live.is_symlink():
        assert not live.exists()
        return None
    assert (live.parent / os.readlink(live)).resolve() == (dev.data / "pitstop" / "versions" / target /
                                                            Path(os.readlink(live)).name)
    return Path(os.readlink(live)).name


def versions(dev: FileDevice, target: str) -> set[str]:
    return {p.name for p in (dev.data / "pitstop" / "versions" / target).iterdir()}


def test_model_only_install_commit_and_revert(capsys: Any, dev: FileDevice, bundles: dict[str, Path]) -> None:
    env, slots = dev.env(), (dev.slot("a").read_bytes(), dev.slot("b").read_bytes())
    v1, v2 = version_id(bundles["model1"], "det"), version_id(bundles["model2"], "det")
    out = installed(capsys, dev, bundles["model1"])
    assert "into the data partition" in out
    assert link_of(dev, "models/det") == v1  # switched at install
    model_dir = dev.data / "models" / "det"
    assert sorted(p.name for p in model_dir.iterdir()) == ["det.onnx", "model.json"]
    assert (model_dir / "det.onnx").read_bytes() == mixed_data(50_000, 8)
    st = status(capsys, dev)
    assert st["payloads"]["models/det"] == {"current": None, "previous": None, "pending": v1}
    assert st["pending_payloads"]["version"] == "1.0.0" and st["phase"] == "none"
    assert mark_good(capsys, dev).rc == 0
    st = status(capsys, dev)
    assert st["payloads"]["models/det"] == {"current": v1, "previous": None, "pending": None}
    assert st["pending_payloads"] is None and st["committed_security_version"] == 1
    # a second version, then back to the first with `mark-bad` (no slot)
    installed(capsys, dev, bundles["model2"])
    assert link_of(dev, "models/det") == v2 and versions(dev, "models/det") == {v1, v2}
    r = mark_bad(capsys, dev)
    assert r.rc == 0, r.err
    assert link_of(dev, "models/det") == v1 and versions(dev, "models/det") == {v1}
    st = status(capsys, dev)
    assert st["payloads"]["models/det"] == {"current": v1, "previous": None, "pending": None}
    assert st["committed_security_version"] == 1
    # and forward again, committed this time: the previous version is kept for rollback
    installed(capsys, dev, bundles["model2"])
    assert mark_good(capsys, dev).rc == 0
    st = status(capsys, dev)
    assert st["payloads"]["models/det"] == {"current": v2, "previous": v1, "pending": None}
    assert st["committed_security_version"] == 4
    assert link_of(dev, "models/det") == v2 and versions(dev, "models/det") == {v1, v2}
    r = run_cli(capsys, "status", "--config", dev.config_path)
    assert f"models/det: current {v2}  previous {v1}" in r.out
    # the slots and the boot configuration were never involved
    assert dev.env() == env and (dev.slot("a").read_bytes(), dev.slot("b").read_bytes()) == slots


def test_files_only_install(capsys: Any, dev: FileDevice, bundles: dict[str, Path]) -> None:
    f1, f2 = version_id(bundles["files1"], "config"), version_id(bundles["files2"], "config")
    installed(capsys, dev, bundles["files1"])
    live = dev.data / "etc" / "app"
    assert link_of(dev, "etc/app") == f1 and (live / "app.conf").read_text() == "one\n"
    assert (live / "sub" / "rules.txt").read_text() == "one\n" * 3
    assert mark_good(capsys, dev).rc == 0
    installed(capsys, dev, bundles["files2"])
    assert (live / "app.conf").read_text() == "two\n"
    # another payload-only install while this one awaits commit: refused, and so is a rootfs install (the
    # pending version is live already and would be forgotten)
    for b in ("files1", "v2"):
        before = dev.snapshot()
        assert_refused(install(capsys, dev, bundles[b]), STATE)
        assert dev.snapshot() == before
    assert mark_bad(capsys, dev).rc == 0
    assert link_of(dev, "etc/app") == f1 and (live / "app.conf").read_text() == "one\n"
    assert versions(dev, "etc/app") == {f1}
    installed(capsys, dev, bundles["files2"])
    assert mark_good(capsys, dev).rc == 0
    assert status(capsys, dev)["payloads"]["etc/app"] == {"current": f2, "previous": f1, "pending": None}


def test_model_follows_the_slot(capsys: Any, dev: FileDevice, bundles: dict[str, Path]) -> None:
    """With a rootfs, the model switches only when the new slot boots, and rolls back with the slot."""
    v1, vc = version_id(bundles["model1"], "det"), version_id(bundles["combo"], "det")
    installed(capsys, dev, bundles["model1"])
    assert mark_good(capsys, dev).rc == 0
    for attempt in ("fail", "succeed"):
        installed(capsys, dev, bundles["combo"])
        assert link_of(dev, "models/det") == v1  # activated, not booted: the running system keeps its model
        st = status(capsys, dev)
        assert st["payloads"]["models/det"]["pending"] == vc and st["phase"] == "activated"
        assert dev.reboot() == "b"
        reconcile(dev)
        assert link_of(dev, "models/det") == vc  # on trial: the new slot with the new model
        if attempt == "fail":
            while dev.reboot() != "a":
                pass
            reconcile(dev)
            assert link_of(dev, "models/det") == v1
            assert status(capsys, dev)["phase"] == "rolled-back"
            assert mark_good(capsys, dev).rc == 0
            assert link_of(dev, "models/det") == v1 and versions(dev, "models/det") == {v1}
            st = status(capsys, dev)
            assert st["payloads"]["models/det"] == {"current": v1, "previous": None, "pending": None}
            assert st["committed_security_version"] == 1
        else:
            assert mark_good(capsys, dev).rc == 0
            assert link_of(dev, "models/det") == vc
            st = status(capsys, dev)
            assert st["payloads"]["models/det"] == {"current": vc, "previous": v1, "pending": None}
            assert st["committed_security_version"] == 5


def test_model_mark_bad_on_trial_restores_model(capsys: Any, dev: FileDevice, bundles: dict[str, Path]) -> None:
    v1 = version_id(bundles["model1"], "det")
    installed(capsys, dev, bundles["model1"])
    assert mark_good(capsys, dev).rc == 0
    installed(capsys, dev, bundles["combo"])
    assert dev.reboot() == "b"
    reconcile(dev)
    assert mark_bad(capsys, dev).rc == 0
    assert link_of(dev, "models/det") == v1 and versions(dev, "models/det") == {v1}


@pytest.mark.parametrize("kind", ["directory", "file", "dangling-ok"])
def test_live_path_that_is_not_a_link(capsys: Any, dev: FileDevice, bundles: dict[str, Path], kind: str) -> None:
    live = dev.data / "models" / "det"
    live.parent.mkdir(parents=True)
    if kind == "directory":
        live.mkdir()
        (live / "mine.onnx").write_text("user data")
    elif kind == "file":
        live.write_text("user data")
    else:
        live.symlink_to("nowhere")  # a link (even dangling) is pitstop's to replace
    before = dev.snapshot()
    for b in ("model1", "combo"):
        r = install(capsys, dev, bundles[b])
        if kind == "dangling-ok":
            assert r.rc == 0, r.err
            return
        assert_refused(r, STATE)
        assert str(live) in r.err and "not a pitstop-managed link" in r.err
        assert dev.snapshot() == before


# --- bad input: refused, the device byte-identical -----------------------------------------------------


def refused_untouched(capsys: Any, dev: FileDevice, bundle: Path, code: int | set[int]) -> CliResult:
    before = dev.snapshot()
    r = install(capsys, dev, bundle)
    assert_refused(r, code)
    assert dev.snapshot() == before, f"{bundle.name}: refused with {r.rc}, but the device changed"
    assert not [p for p in dev.root.rglob("*") if ".tmp" in p.name], "temporary files left behind"
    return r


def committed_device(capsys: Any, dev: FileDevice, bundles: dict[str, Path]) -> FileDevice:
    """A device with history: v2 committed in b, running b; bad input must not disturb any of it."""
    installed(capsys, dev, bundles["v2"])
    assert dev.reboot() == "b" and mark_good(capsys, dev).rc == 0
    return dev


@pytest.fixture
def used_dev(capsys: Any, dev: FileDevice, bundles: dict[str, Path]) -> FileDevice:
    return committed_device(capsys, dev, bundles)


# Refused only while streaming: the manifest is signed by a trusted key but lies about the uncompressed
# content, which no check before the first write can see without decompressing everything twice.
STREAM_DETECTED = {"payload hash wrong"}


@pytest.mark.parametrize("name, mutate, code", CASES, ids=[c[0] for c in CASES])
def test_signed_but_inconsistent(tmp_path: Path, capsys: Any, keys: Keys, dev: FileDevice,
                                 bundles: dict[str, Path], name: str, mutate: Any, code: int) -> None:
    bad = resign(bundles["good"], tmp_path / "bad.pitb", keys, mutate)
    if name not in STREAM_DETECTED:
        refused_untouched(capsys, dev, bad, code)
        return
    # On a device with history (v2 committed in b, running b), a is the OK fallback: the target.
    dev = committed_device(capsys, dev, bundles)
    before = dev.snapshot()
    assert_refused(install(capsys, dev, bad), code)
    after = dev.snapshot()
    # The running slot is untouched and still boots next; the target lost its OK flag before the first byte
    # was written and is recorded as being written; a good install recovers.
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert "slot_b.img" not in changed, changed
    env = dev.env()
    assert (env["ORDER"], env["b_OK"], env["b_TRY"], env["a_OK"], env["a_TRY"]) == ("b a", "1", "3", "0", "0")
    st = status(capsys, dev)
    assert slot_view(st, "a")["content"] == "writing" and not slot_view(st, "a")["bootable"]
    assert (st["next_boot"], st["phase"], st["committed_security_version"]) == ("b", "none", 2)
    assert [dev.reboot() for _ in range(2 * TRIES)] == ["b"] * (2 * TRIES)  # never the half-written a
    installed(capsys, dev, bundles["v3"])
    assert dev.reboot() == "a"


# A flip inside a certificate's serial number: cryptography warns while parsing it; the bundle is refused.
@pytest.mark.filterwarnings("ignore:Parsed a serial number")
def test_bit_flips_everywhere(tmp_path: Path, capsys: Any, used_dev: FileDevice, bundles: dict[str, Path]) -> None:
    raw = bundles["good"].read_bytes()
    rng = random.Random(11)
    positions = set(range(0, fmt.HEADER_SIZE, 3))
    for start, size in _regions(bundles["good"]).values():
        positions |= {start, start + size - 1, start + size // 2, start + rng.randrange(size)}
    bad = tmp_path / "flip.pitb"
    for pos in sorted(positions):
        flipped = bytearray(raw)
        flipped[pos] ^= 1 << rng.randrange(8)
        bad.write_bytes(flipped)
        refused_untouched(capsys, used_dev, bad, REFUSALS)


def test_truncated_and_trailing(tmp_path: Path, capsys: Any, used_dev: FileDevice, bundles: dict[str, Path]) -> None:
    raw = bundles["good"].read_bytes()
    cuts = {0, 1, 63, 64, len(raw) - 1}
    for start, size in _regions(bundles["good"]).values():
        cuts |= {start, start + size // 2, start + size - 1}
    bad = tmp_path / "cut.pitb"
    for cut in sorted(c for c in cuts if c < len(raw)):
        bad.write_bytes(raw[:cut])
        refused_untouched(capsys, used_dev, bad, {BUNDLE, SIGNATURE})
    bad.write_bytes(raw + b"\0")
    refused_untouched(capsys, used_dev, bad, BUNDLE)
    bad.write_bytes(b"not a bundle at all" * 100)
    refused_untouched(capsys, used_dev, bad, BUNDLE)
    r = refused_untouched(capsys, used_dev, tmp_path / "missing.pitb", 4)
    assert "missing.pitb" in r.err


def test_unsigned_foreign_and_forged(tmp_path: Path, capsys: Any, keys: Keys, other_keys: Keys,
                                     used_dev: FileDevice, bundles: dict[str, Path]) -> None:
    r = refused_untouched(capsys, used_dev, bundles["foreign"], SIGNATURE)
    assert "not signed" in r.err
    stranger = resign(bundles["v3"], tmp_path / "stranger.pitb", other_keys)
    assert "keyring" in refused_untouched(capsys, used_dev, stranger, TRUST).err
    # our certificates in the block, a stranger's signature
    with open(stranger, "rb") as f:
        pre = read_preamble(f)
    block = pre.signature_block()
    fake = SignatureBlock(block.algorithm, block.signature, (keys.pki.signing, keys.pki.intermediate)).encode()
    h = pre.header
    forged = tmp_path / "forged.pitb"
    forged.write_bytes(fmt.encode_header(fmt.Header(h.manifest_size, len(fake), h.payload_area_size))
                       + pre.manifest_bytes + fake + stranger.read_bytes()[h.payload_offset:])
    refused_untouched(capsys, used_dev, forged, SIGNATURE)


def test_incompatible(capsys: Any, used_dev: FileDevice, bundles: dict[str, Path]) -> None:
    r = refused_untouched(capsys, used_dev, bundles["incompatible"], COMPAT)
    assert "other-device" in r.err and "pitstop-test" in r.err


def test_downgrade(capsys: Any, used_dev: FileDevice, bundles: dict[str, Path]) -> None:
    refused_untouched(capsys, used_dev, bundles["low"], DOWNGRADE)


def test_expired_certificate(tmp_path: Path, capsys: Any, bundles: dict[str, Path]) -> None:
    now = datetime.now(UTC)
    k = make_keys(tmp_path / "k", signing_not_before=now - timedelta(days=800),
                  signing_not_after=now - timedelta(days=400))
    dev = make_device(tmp_path / "dev", k)
    expired = resign(bundles["foreign"], tmp_path / "expired.pitb", k)
    refused_untouched(capsys, dev, expired, TIME)


# --- the target slot ----------------------------------------------------------------------------------


def test_target_slot_too_small(tmp_path: Path, capsys: Any, keys: Keys, bundles: dict[str, Path]) -> None:
    dev = make_device(tmp_path / "dev", keys, slot_size=1 << 20)
    r = refused_untouched(capsys, dev, bundles["v2"], SLOT)
    assert "holds 1048576 bytes" in r.err and "needs 1500000" in r.err


@pytest.mark.parametrize("kind", ["directory", "missing", "fifo"])
def test_target_slot_not_a_slot(capsys: Any, dev: FileDevice, bundles: dict[str, Path], kind: str) -> None:
    b = dev.slot("b")
    b.unlink()
    if kind == "directory":
        b.mkdir()
    elif kind == "fifo":
        os.mkfifo(b)
    r = refused_untouched(capsys, dev, bundles["v2"], SLOT)
    assert str(b) in r.err


def block_device() -> Path:
    for p in sorted(Path("/dev").iterdir()):
        try:
            if stat.S_ISBLK(p.stat().st_mode):
                return p
        except OSError:
            continue
    pytest.skip("no block device node in /dev")


def test_check_target_refuses_mounted_and_running_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = block_device()
    rdev = dev.stat().st_rdev
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"36 35 {os.major(rdev)}:{os.minor(rdev)} / /mnt/slot rw - ext4 {dev} rw\n")
    with pytest.raises(SlotError, match="mounted on /mnt/slot"):
        slot_device.check_target(dev, 1, mountinfo=mountinfo)
    real_stat = os.stat

    def fake_stat(path: Any, *a: Any, **kw: Any) -> Any:
        st = real_stat(path, *a, **kw)
        if os.fspath(path) == "/":
            return os.stat_result((st.st_mode, st.st_ino, rdev, *tuple(st)[3:]))
        return st

    monkeypatch.setattr(os, "stat", fake_stat)  # the module slot_device uses; only for the next call
    with pytest.raises(SlotError, match="running root file system"):
        slot_device.check_target(dev, 1, mountinfo=mountinfo)


@pytest.fixture
def loop_slot(tmp_path: Path, tool: Callable[[str], str]) -> Iterator[tuple[Path, Path]]:
    """slot b's file behind a loop device with an ext4 file system mounted from it."""
    losetup, mkfs, mount, umount = tool("losetup"), tool("mkfs.ext4"), tool("mount"), tool("umount")
    img = tmp_path / "loop.img"
    img.write_bytes(bytes(8 << 20))
    loop = Path(subprocess.run([losetup, "--find", "--show", img], check=True, capture_output=True, text=True)
                .stdout.strip())
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = False
    try:
        subprocess.run([mkfs, "-q", loop], check=True, capture_output=True)
        subprocess.run([mount, loop, mnt], check=True, capture_output=True)
        mounted = True
        yield loop, mnt
    finally:
        if mounted:
            subprocess.run([umount, mnt], check=False, capture_output=True)
        subprocess.run([losetup, "-d", loop], check=False, capture_output=True)


@pytest.mark.root
def test_mounted_target_slot_refused(capsys: Any, dev: FileDevice, bundles: dict[str, Path],
                                     loop_slot: tuple[Path, Path]) -> None:
    loop, mnt = loop_slot
    text = dev.config_path.read_text()
    dev.config_path.write_text(text.replace(f'device = "{dev.slot("b")}"', f'device = "{loop}"'))
    image = loop.read_bytes()[:1 << 20]
    r = refused_untouched(capsys, dev, bundles["v2"], SLOT)
    assert f"{loop} is mounted on {mnt}" in r.err
    assert loop.read_bytes()[:1 << 20] == image


# --- the boot environment on disk ---------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "no-signature", "missing"])
def test_torn_grubenv_refused(capsys: Any, used_dev: FileDevice, bundles: dict[str, Path], damage: str) -> None:
    dev = used_dev
    block = dev.grubenv.read_bytes()
    if damage == "truncated":
        dev.grubenv.write_bytes(block[:700])
    elif damage == "garbage":
        dev.grubenv.write_bytes(random.Random(1).randbytes(1024))
    elif damage == "empty":
        dev.grubenv.write_bytes(b"")
    elif damage == "no-signature":
        dev.grubenv.write_bytes(b"X" + block[1:])
    else:
        dev.grubenv.unlink()
    before = dev.snapshot()
    commands: list[list[str | os.PathLike[str]]] = [
        ["-q", "install", "--config", dev.config_path, bundles["v3"]],
        ["status", "--config", dev.config_path],
        ["mark-good", "--config", dev.config_path],
        ["mark-bad", "a", "--config", dev.config_path],
    ]
    for args in commands:
        r = run_cli(capsys, *args)
        assert_refused(r, BOOTENV)
        assert str(dev.grubenv) in r.err
        assert dev.snapshot() == before
    # repaired (as grub-editenv would), the device carries on
    dev.grubenv.write_bytes(grubenv.encode({"ORDER": "b a", "a_OK": "1", "a_TRY": "3", "b_OK": "1", "b_TRY": "3"}))
    installed(capsys, dev, bundles["v3"])


def test_state_file_damaged_refused(capsys: Any, used_dev: FileDevice, bundles: dict[str, Path]) -> None:
    path = used_dev.data / "pitstop" / "state.json"
    for content in ("{", '{"format": 99}', json.dumps({**state_json(used_dev), "slots": {"a": {}}})):
        path.write_text(content)
        before = used_dev.snapshot()
        r = install(capsys, used_dev, bundles["v3"])
        assert_refused(r, 25)
        assert str(path) in r.err and used_dev.snapshot() == before


def test_leaves_no_state_for_a_refused_first_install(capsys: Any, dev: FileDevice, bundles: dict[str, Path]) -> None:
    refused_untouched(capsys, dev, bundles["incompatible"], COMPAT)
    assert not (dev.data / "pitstop").exists()


def test_first_model_version_dropped_leaves_no_link(capsys: Any, dev: FileDevice, bundles: dict[str, Path]) -> None:
    """`mark-bad` of the first version ever of a target: nothing to go back to, so its link and files go."""
    installed(capsys, dev, bundles["model1"])
    assert (dev.data / "models" / "det").is_dir()
    r = mark_bad(capsys, dev)
    assert r.rc == 0, r.err
    assert not (dev.data / "models" / "det").exists() and not (dev.data / "models" / "det").is_symlink()
    assert versions(dev, "models/det") == set()
    assert "models/det" not in status(capsys, dev)["payloads"]
