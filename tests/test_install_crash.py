"""Crash consistency: `pitstop install` and `pitstop mark-good` SIGKILLed anywhere leave a device that boots.

Each kill runs the real command in a child process (`python -m pitstop.cli`) and kills it either at a named
crash point (`PITSTOP_CRASHPOINT=NAME:N`, pitstop/crashpoint.py) or after a random delay. After every kill:

- grubenv is exactly 1024 bytes and decodes (never torn);
- the running slot is bit for bit untouched; either it is still primary (and bootable), or the new slot is
  primary with `_OK=1`, full tries and its bytes equal to the bundle's payload (SHA-256);
- a slot being overwritten (neither its old bytes nor a complete payload) is never bootable;
- `pitstop status --json` works;
then `pitstop install` again (in this process, no crash point) completes and ends activated.

Scenarios: `fresh` (factory device, install into b), `reinstall` (b already holds an activated, not yet
booted install: the new install first deactivates it) and `second` (b committed and running, install into a).
Torn writes of the environment block (as GRUB's in-place `save_env` could leave them) are simulated below.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from bundlekit import Keys, make_bundle, mixed_data, rootfs_payload
from devicekit import TestDevice as Dev
from devicekit import make_device
from httpkit import FileServer

from pitstop import crashpoint
from pitstop.cli import main as cli_main
from pitstop.ota import grubenv
from pitstop.ota.bootloader import env_from_vars
from pitstop.ota.errors import BootEnvError
from pitstop.ota.slot_state import BootEnv

SLOTS = {"a": "a", "b": "b"}
TRIES = 3
SLOT_SIZE = 4 << 20
PAYLOAD_SIZE = 3 << 20
CHUNKING = (2048, 8192, 32768)       # ~300 chunks in 3 MiB: many slot-write points
SEED = 20240611
BOOT_ENV = BootEnvError.exit_code


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cli(*args: str | Path) -> tuple[int, str]:
    """`pitstop ARGS` in this process (no crash point is armed here): exit code and stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            rc = cli_main(["-q", *(os.fspath(a) for a in args)])
        except SystemExit as e:
            rc = int(e.code or 0)
    return rc, out.getvalue()


def read_env(dev: Dev) -> BootEnv:
    block = dev.grubenv.read_bytes()
    assert len(block) == grubenv.SIZE, f"grubenv is {len(block)} bytes"
    return env_from_vars(grubenv.decode(block), SLOTS)


def slot_payload_sha(dev: Dev, slot: str, size: int) -> str:
    with dev.slot(slot).open("rb") as f:
        return sha(f.read(size))


def status_json(dev: Dev) -> dict[str, Any]:
    rc, out = cli("status", "--json", "--config", dev.config_path)
    assert rc == 0, f"pitstop status exited {rc}"
    st: dict[str, Any] = json.loads(out)
    return st


# --- the rig: bundles, a server, devices in each scenario's starting state --------------------------------


@dataclass(frozen=True)
class Bundle:
    path: Path
    url: str
    payload_sha: str


@dataclass
class Rig:
    root: Path
    keys: Keys
    server: FileServer
    v2: Bundle
    v3: Bundle
    counts: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)  # (scenario, source) → hits
    seconds: dict[tuple[str, str], float] = field(default_factory=dict)       # a whole run in a child
    serial: int = 0

    def source(self, b: Bundle, kind: str) -> str:
        return b.url if kind == "http" else str(b.path)

    def device(self, scenario: str) -> Dev:
        self.serial += 1
        dev = make_device(self.root / f"dev{self.serial}", self.keys, slot_size=SLOT_SIZE, tries=TRIES)
        if scenario in ("reinstall", "second"):
            assert cli("install", "--config", dev.config_path, self.v2.path)[0] == 0
        if scenario == "second":
            assert dev.reboot() == "b"
            assert cli("mark-good", "--config", dev.config_path)[0] == 0
        return dev


@dataclass(frozen=True)
class Scenario:
    name: str
    booted: str
    target: str
    bundle: Bundle
    verified: frozenset[str]    # payload hashes the target may hold while bootable


def scenario(rig: Rig, name: str) -> Scenario:
    if name == "fresh":
        return Scenario(name, "a", "b", rig.v2, frozenset({rig.v2.payload_sha}))
    if name == "reinstall":
        return Scenario(name, "a", "b", rig.v3, frozenset({rig.v2.payload_sha, rig.v3.payload_sha}))
    return Scenario(name, "b", "a", rig.v3, frozenset({rig.v3.payload_sha}))


@contextlib.contextmanager
def counting_hits() -> Iterator[Counter[str]]:
    counts: Counter[str] = Counter()
    real = crashpoint.hit

    def hit(name: str) -> None:
        counts[name] += 1
        real(name)

    crashpoint.hit = hit
    try:
        yield counts
    finally:
        crashpoint.hit = real


def child(dev: Dev, source: str, *, point: str | None = None, rate: str | None = None,
          command: str = "install") -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "PITSTOP_CRASHPOINT"}
    if point:
        env["PITSTOP_CRASHPOINT"] = point
    args = [sys.executable, "-m", "pitstop.cli", "-q", command, "--config", str(dev.config_path)]
    if command == "install":
        args += [*(("--rate-limit", rate) if rate else ()), source]
    return subprocess.Popen(args, env=env, cwd=dev.root, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("crash")
    with FileServer() as server:
        bundles = []
        for version, seed in (("2.0.0", 1), ("3.0.0", 2)):
            data = mixed_data(PAYLOAD_SIZE, seed=seed)
            path = make_bundle(root / f"v{version}.pitb", [rootfs_payload(root / f"rootfs{seed}.img", data)], keys,
                               version=version, security_version=int(version[0]), chunking=CHUNKING)
            bundles.append(Bundle(path, server.add(path.name, path), sha(data)))
        r = Rig(root, keys, server, bundles[0], bundles[1])
        # Calibration: how often each crash point is hit by a whole install, and how long a child takes.
        for name in ("fresh", "reinstall", "second"):
            sc = scenario(r, name)
            for kind in ("http", "file"):
                dev = r.device(name)
                with counting_hits() as counts:
                    assert cli("install", "--config", dev.config_path, r.source(sc.bundle, kind))[0] == 0
                r.counts[name, kind] = counts
                dev = r.device(name)
                t0 = time.monotonic()
                p = child(dev, r.source(sc.bundle, kind))
                _, err = p.communicate(timeout=60)
                assert p.returncode == 0, err.decode()
                r.seconds[name, kind] = time.monotonic() - t0
        yield r


# --- checks ---------------------------------------------------------------------------------------------


def check_bootable(dev: Dev, sc: Scenario, before: dict[str, str]) -> str:
    """The invariants after a kill; returns the phase the device was left in (for the summary)."""
    env = read_env(dev)
    snap = dev.snapshot()
    old, new = sc.booted, sc.target
    assert snap[f"slot_{old}.img"] == before[f"slot_{old}.img"], "the running slot was written"
    new_sha = slot_payload_sha(dev, new, PAYLOAD_SIZE)
    # What the target may hold while bootable: a complete payload, or what it held before (not written yet).
    whole = new_sha in sc.verified or snap[f"slot_{new}.img"] == before[f"slot_{new}.img"]
    if env.primary == old:
        assert env.bootable(old) and env.next_boot() == old, env
    else:
        assert env.primary == new, env
        assert env.ok[new] and env.tries[new] == TRIES, env
        assert new_sha in sc.verified, "the new slot is primary but does not hold a complete payload"
    if env.bootable(new):
        assert whole, f"slot {new} is bootable but half written: {env}"
    nxt = env.next_boot()
    assert nxt == old or whole, env
    st = status_json(dev)
    assert st["booted"] == old
    target = next(s for s in st["slots"] if s["name"] == new)
    if target["content"] == "writing":
        assert not target["bootable"]
    if env.primary == new:
        return "switched"
    if target["content"] == "writing":
        return "writing"
    return "installed" if st["pending"] == new else "not started"


def check_recovers(dev: Dev, sc: Scenario, source: str) -> None:
    rc, _ = cli("install", "--config", dev.config_path, source)
    assert rc == 0, f"the install after the crash failed with exit {rc}"
    env = read_env(dev)
    assert env.order == (sc.target, sc.booted) and env.ok[sc.target] and env.tries[sc.target] == TRIES, env
    assert env.ok[sc.booted], env
    assert slot_payload_sha(dev, sc.target, PAYLOAD_SIZE) == sc.bundle.payload_sha
    st = status_json(dev)
    assert (st["phase"], st["pending"], st["next_boot"]) == ("activated", sc.target, sc.target), st


def leftovers(dev: Dev) -> list[str]:
    return sorted(p.name for p in (*dev.grubenv.parent.glob(".grubenv.*"), *(dev.data / "pitstop").glob(".*.tmp")))


# --- the kill plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    scenario: str
    source: str                # "http" or "file"
    point: str | None          # NAME:N, or None for a kill after `delay` seconds
    delay: float = 0.0
    rate: str | None = None
    chain: int = 0             # kills before this one on the same device without recovery in between

    @property
    def phase(self) -> str:
        return self.point.split(":")[0] if self.point else "time"


def plan(rig: Rig, rng: random.Random) -> list[list[Kill]]:
    """Runs of kills; each run is one device, killed once or more, then recovered."""
    runs: list[list[Kill]] = []

    def pick(sc: str, kind: str, name: str, *, lo: int = 1, hi: int | None = None) -> Kill:
        n = rig.counts[sc, kind][name]
        assert n >= 1, (sc, kind, name, rig.counts[sc, kind])
        return Kill(sc, kind, f"{name}:{rng.randint(lo, hi or n)}")

    for i in range(12):  # download: each HTTP read, header to last chunk (their number varies a little)
        sc = ("fresh", "reinstall", "second")[i % 3]
        runs.append([pick(sc, "http", "download", hi=max(1, rig.counts[sc, "http"]["download"] - 3))])
    for i in range(12):  # slot write: after a random chunk
        runs.append([pick(("fresh", "reinstall", "second")[i % 3], ("http", "file")[i % 2], "slot-write")])
    for sc in ("fresh", "reinstall", "second"):  # state recording: every state.json write, before and after
        for n in range(1, rig.counts[sc, "file"]["state-write"] + 1):
            runs.append([Kill(sc, rng.choice(("http", "file")), f"state-write:{n}")])
    for sc in ("fresh", "reinstall", "second"):  # the boot switch, and every grubenv write's two halves
        runs.append([Kill(sc, rng.choice(("http", "file")), "activate:1")])
        for n in range(1, rig.counts[sc, "file"]["grubenv-write"] + 1):
            runs.append([Kill(sc, rng.choice(("http", "file")), f"grubenv-write:{n}")])
    for i in range(15):  # any instant; three of them over HTTP at 2 MiB/s, so that writing takes longer
        sc = ("fresh", "reinstall", "second")[i % 3]
        kind = ("http", "file", "http")[(i // 3) % 3]
        rate = "2M" if i % 5 == 4 else None
        kind = "http" if rate else kind
        span = rig.seconds[sc, kind] + (scenario(rig, sc).bundle.path.stat().st_size / (2 << 20) if rate else 0)
        runs.append([Kill(sc, kind, None, delay=rng.uniform(0.15, span * 1.05), rate=rate)])
    for i in range(6):  # kill after kill on one device, no recovery in between
        sc = ("fresh", "second")[i % 2]
        kills = [pick(sc, "http", "slot-write"), pick(sc, "file", "state-write"),
                 Kill(sc, "http", None, delay=rng.uniform(0.2, rig.seconds[sc, "http"]))]
        rng.shuffle(kills)
        runs.append([Kill(k.scenario, k.source, k.point, k.delay, k.rate, chain=j) for j, k in enumerate(kills)])
    rng.shuffle(runs)
    return runs


def run_kill(rig: Rig, dev: Dev, sc: Scenario, k: Kill) -> bool:
    """One child run; True if it was killed (False: it finished first, which a random delay allows)."""
    p = child(dev, rig.source(sc.bundle, k.source), point=k.point, rate=k.rate)
    if k.point is None:
        time.sleep(k.delay)
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGKILL)
    _, err = p.communicate(timeout=60)
    if p.returncode == -signal.SIGKILL:
        return True
    # A random delay may outlast the run; so may a late download point (reads vary in size from run to run).
    assert k.phase in ("time", "download"), f"{k}: not killed at its crash point (exit {p.returncode}): " \
        f"{err.decode()[-500:]}"
    assert p.returncode == 0, f"{k}: exit {p.returncode}: {err.decode()[-500:]}"
    return False


def test_install_killed_anywhere(rig: Rig) -> None:
    rng = random.Random(SEED)
    runs = plan(rig, rng)
    per_phase: Counter[str] = Counter()
    left_in: Counter[str] = Counter()
    finished = 0
    with_leftovers = 0
    t0 = time.monotonic()
    for run in runs:
        sc = scenario(rig, run[0].scenario)
        dev = rig.device(sc.name)
        before = dev.snapshot()
        for k in run:
            killed = run_kill(rig, dev, sc, k)
            try:
                left = check_bootable(dev, sc, before)
            except AssertionError as e:
                raise AssertionError(f"after {k}: {e}") from None
            if killed:
                per_phase[k.phase] += 1
                left_in[left] += 1
            else:
                finished += 1
        with_leftovers += bool(leftovers(dev))
        try:
            check_recovers(dev, sc, rig.source(sc.bundle, run[-1].source))
        except AssertionError as e:
            raise AssertionError(f"recovery after {run}: {e}") from None
    kills = sum(per_phase.values())
    summary = ", ".join(f"{p} {n}" for p, n in sorted(per_phase.items()))
    states = ", ".join(f"{p} {n}" for p, n in sorted(left_in.items()))
    print(f"\ncrash: {kills} SIGKILLs in {time.monotonic() - t0:.1f} s: {summary}; {finished} runs finished before "
          f"their kill; devices left {states}; {with_leftovers} kept a killed writer's temp files; all recovered")
    assert kills >= 50
    assert {"download", "slot-write", "state-write", "activate", "grubenv-write", "time"} <= set(per_phase)


# --- mark-good ------------------------------------------------------------------------------------------


def test_mark_good_killed_anywhere(rig: Rig) -> None:
    """Booted into the new slot b, `pitstop mark-good` killed at each write: the device still boots an OK slot
    holding a complete image, and mark-good run again (after a reboot or not) commits."""
    rng = random.Random(SEED + 1)
    points: list[str | None] = ["state-write:1", "state-write:2", "grubenv-write:1", "grubenv-write:2",
                                *([None] * 4)]
    kills = 0
    for i, point in enumerate(points):
        dev = rig.device("reinstall")  # b holds v2, activated
        assert dev.reboot() == "b"
        a_before = dev.snapshot()["slot_a.img"]
        p = child(dev, "", point=point, command="mark-good")
        if point is None:
            time.sleep(rng.uniform(0.15, 0.5))
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGKILL)
        _, err = p.communicate(timeout=60)
        assert p.returncode in ((-signal.SIGKILL, 0) if point is None else (-signal.SIGKILL,)), err.decode()
        kills += p.returncode == -signal.SIGKILL
        env = read_env(dev)
        nxt = env.next_boot()
        assert nxt is not None and env.ok[nxt], env
        if nxt == "b":
            assert slot_payload_sha(dev, "b", PAYLOAD_SIZE) == rig.v2.payload_sha
        assert dev.snapshot()["slot_a.img"] == a_before
        status_json(dev)
        if i % 2:
            assert dev.reboot() == "b"  # power lost right after the kill: GRUB spends another try on b
        rc, _ = cli("mark-good", "--config", dev.config_path)
        assert rc == 0
        env = read_env(dev)
        assert env.order == ("b", "a") and env.ok["b"] and env.tries["b"] == TRIES, env
        st = status_json(dev)
        assert (st["phase"], st["committed_security_version"]) == ("none", 2), st
        assert next(s for s in st["slots"] if s["name"] == "b")["content"] == "good"
    print(f"\nmark-good: {kills} kills, all committed afterwards")
    assert kills >= 4


# --- torn environment blocks ----------------------------------------------------------------------------


def env_block(order: str, a: tuple[int, int], b: tuple[int, int], generation: int | None = None) -> bytes:
    env = {"ORDER": order, "a_OK": str(a[0]), "a_TRY": str(a[1]), "b_OK": str(b[0]), "b_TRY": str(b[1])}
    return grubenv.encode(env if generation is None else grubenv.with_generation(env, generation))


def decoded(block: bytes) -> BootEnv | None:
    try:
        env = grubenv.decode(block)
        grubenv.check_generation(env)
        return env_from_vars(env, SLOTS)
    except BootEnvError:
        return None


def torn(old: bytes, new: bytes) -> Iterator[tuple[int, bytes]]:
    """The block after an in-place write of `new` over `old` stopped after k bytes, for every k that gives a
    block not seen yet (where the two agree, a longer cut changes nothing)."""
    seen: set[bytes] = set()
    for k in range(len(new) + 1):
        block = new[:k] + old[k:]
        if block not in seen:
            seen.add(block)
            yield k, block


def status_env(dev: Dev) -> tuple[int, BootEnv | None]:
    rc, out = cli("status", "--json", "--config", dev.config_path)
    if rc != 0:
        return rc, None
    st = json.loads(out)
    order = tuple(s["name"] for s in sorted(st["slots"], key=lambda s: not s["primary"]))
    return rc, BootEnv(order, {s["name"]: s["bootable"] for s in st["slots"]},
                       {s["name"]: s["tries_left"] for s in st["slots"]})


def same_view(a: BootEnv, b: BootEnv) -> bool:
    return (a.primary, a.tries, {s: a.bootable(s) for s in SLOTS}) == (b.primary, b.tries,
                                                                        {s: b.bootable(s) for s in SLOTS})


# What GRUB's save_env writes over what was there: only one slot's try counter changes, one digit.
GRUB_WRITES = {
    "factory boot": (env_block("a b", (1, 3), (0, 0)), env_block("a b", (1, 2), (0, 0))),
    "first boot of b": (env_block("b a", (1, 3), (1, 3)), env_block("b a", (1, 3), (1, 2))),
    "last try of b": (env_block("b a", (1, 3), (1, 1)), env_block("b a", (1, 3), (1, 0))),
    "fallback to a": (env_block("b a", (1, 3), (1, 0)), env_block("b a", (1, 2), (1, 0))),
}


@pytest.mark.parametrize("name", sorted(GRUB_WRITES))
def test_torn_grub_save_env(rig: Rig, name: str) -> None:
    """GRUB rewrites grubenv in place. Cut that write after any number of bytes: pitstop reads the old or the
    new block, never a mix, and `status` and `install` act on what they read (or refuse: exit 22)."""
    old, new = GRUB_WRITES[name]
    dev = rig.device("fresh")
    old_env, new_env = decoded(old), decoded(new)
    assert old_env is not None and new_env is not None
    seen: Counter[str] = Counter()
    for k, block in torn(old, new):
        dev.grubenv.write_bytes(block)
        rc, env = status_env(dev)
        assert rc in (0, BOOT_ENV), (k, rc)
        if env is None:
            seen["refused"] += 1
            continue
        assert same_view(env, old_env) or same_view(env, new_env), (k, env)
        seen["old" if block == old else "new" if block == new else "mix"] += 1
    assert seen["mix"] == 0 and seen["refused"] == 0, seen
    # install at the instant the cut changes the outcome: reads one of the two and installs.
    first_diff = next(i for i in range(len(old)) if old[i] != new[i])
    for k in (first_diff, first_diff + 1):
        dev = rig.device("fresh")
        dev.grubenv.write_bytes(new[:k] + old[k:])
        before_env = read_env(dev)
        rc, _ = cli("install", "--config", dev.config_path, rig.v2.path)
        if before_env.next_boot() == "b":
            continue  # an artificial block (b next without an install): nothing to check here
        assert rc == 0
        assert read_env(dev).primary == "b"


# pitstop's own transitions, were they written in place (pitstop writes a new file and renames it; GRUB,
# grub-editenv and a FAT file system without that care could leave such a block).
PITSTOP_WRITES = {
    "activate": (env_block("a b", (1, 3), (0, 0), 1), env_block("b a", (1, 3), (1, 3), 2)),
    "deactivate for a new install": (env_block("b a", (1, 3), (1, 3), 8), env_block("a b", (1, 3), (0, 0), 9)),
    "mark-good after rollback": (env_block("b a", (1, 2), (1, 0), 9), env_block("a b", (1, 3), (0, 0), 10)),
}


@pytest.mark.parametrize("name", sorted(PITSTOP_WRITES))
def test_torn_multi_variable_write_is_refused_or_whole(rig: Rig, name: str) -> None:
    """A torn in-place write of a change to several variables, as pitstop writes them (bracketed by generation
    markers): pitstop refuses (exit 22) or sees the old or the new block, at every byte."""
    old, new = PITSTOP_WRITES[name]
    dev = rig.device("fresh")
    old_env, new_env = decoded(old), decoded(new)
    assert old_env is not None and new_env is not None
    mixes = []
    for k, block in torn(old, new):
        dev.grubenv.write_bytes(block)
        rc, env = status_env(dev)
        assert rc in (0, BOOT_ENV), (k, rc)
        if env is not None and not (same_view(env, old_env) or same_view(env, new_env)):
            mixes.append((k, grubenv.decode(block)))
    assert mixes == []


@pytest.mark.parametrize("k", [0, 1, 25, 512, 1023, 1025, 2048])
def test_short_or_long_grubenv_refused(rig: Rig, k: int) -> None:
    """A grubenv of the wrong size (a truncating writer cut short, or appended to) is refused by status and by
    install with exit 22, and install changes nothing."""
    dev = rig.device("fresh")
    full = dev.grubenv.read_bytes()
    dev.grubenv.write_bytes((full + b"#" * 1024)[:k])
    before = dev.snapshot()
    assert cli("status", "--config", dev.config_path)[0] == BOOT_ENV
    assert cli("install", "--config", dev.config_path, rig.v2.path)[0] == BOOT_ENV
    assert cli("mark-good", "--config", dev.config_path)[0] == BOOT_ENV
    assert dev.snapshot() == before


def test_leftover_temp_files_are_ignored(rig: Rig) -> None:
    """Temp files of a killed writer (garbage or a whole block) never stand in for grubenv or state.json."""
    dev = rig.device("fresh")
    status_json(dev)
    assert cli("install", "--config", dev.config_path, rig.v2.path, "--no-activate")[0] == 0
    esp, state = dev.grubenv.parent, dev.data / "pitstop"
    (esp / ".grubenv.k1ll3d.tmp").write_bytes(env_block("b a", (1, 3), (1, 3))[:700])
    (esp / ".grubenv.wh0le.tmp").write_bytes(env_block("b a", (0, 0), (1, 9)))
    (state / ".state.json.k1ll3d.tmp").write_text('{"format": 1, "slots": {')
    (state / ".state.json.wh0le.tmp").write_text("{}")
    st = status_json(dev)
    assert (st["phase"], st["primary"]) == ("installed", "a")
    assert cli("install", "--config", dev.config_path, rig.v3.path)[0] == 0
    assert read_env(dev).order == ("b", "a")
    assert slot_payload_sha(dev, "b", PAYLOAD_SIZE) == rig.v3.payload_sha


# --- the fallback slot while it is overwritten -------------------------------------------------------------


def test_fallback_slot_not_bootable_while_overwritten(rig: Rig) -> None:
    """After a committed update the old slot is the OK fallback; the next install writes into it. From its
    first byte it must not be bootable: GRUB falls back to it when the running slot's tries run out or its
    kernel does not load."""
    sc = scenario(rig, "second")
    dev = rig.device("second")
    assert read_env(dev).bootable("a")
    before = dev.snapshot()
    for point in ("slot-write:1", f"slot-write:{rig.counts['second', 'file']['slot-write'] // 2}"):
        p = child(dev, str(sc.bundle.path), point=point)
        p.communicate(timeout=60)
        assert p.returncode == -signal.SIGKILL
        check_bootable(dev, sc, before)
        env = read_env(dev)
        assert not env.bootable("a") and env.next_boot() == "b", env
        assert slot_payload_sha(dev, "a", PAYLOAD_SIZE) not in sc.verified
