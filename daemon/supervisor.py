"""Supervision of the configured inference loops, each in its own child process, from the daemon's event loop.

Per loop, one asyncio task spawns `python -m pitstop.daemon.loop_child`, reads its JSON lines (up, figures,
last words) and its stderr (forwarded to the log, the tail kept for the cause), waits for its exit, turns the
exit into a cause, and asks the RestartPolicy whether and when to run it again. Nothing here blocks the event
loop: children are asyncio subprocesses, pipes are read by the loop, and the few cgroupfs writes run in a
worker thread.

A stop sends SIGTERM to the child's process group, and SIGKILL after the grace period. Children also die with
the daemon (PR_SET_PDEATHSIG in the child), whatever kills the daemon.

Listeners (`subscribe`) get a LoopEvent on every state change and every figures update: the D-Bus layer turns
them into signals. They run on the event loop and must not block; one that raises is logged and kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pitstop.daemon.config import LoopConfig
from pitstop.daemon.errors import LoopSupervisionError
from pitstop.daemon.limits import FALLBACK, ChildLimits, Limits, child_env, mib
from pitstop.daemon.loop_child import EXIT_CONFIG, EXIT_CRASHED, EXIT_FINISHED, ChildSpec
from pitstop.daemon.restart_policy import STABLE_S, ExitKind, LoopState, RestartPolicy

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long
FIGURES_EVERY_S = 5.0
STDERR_TAIL = 20  # lines of a child's stderr kept for its exit cause
_LINE_LIMIT = 1 << 20  # longest line read from a child; longer ones are skipped
_DRAIN_S = 2.0  # after the exit, how long the pipes may take to reach EOF
_MEMORY = re.compile(r"memory|bad[_ ]alloc|(unable|failed) to allocate", re.I)
_ERRORISH = re.compile(r"error|exception|fatal|abort|terminate called|fail", re.I)
# What native code prints as it dies of a signal: faulthandler, the C++ runtime's abort.
_DYING = re.compile(r"^Fatal Python error|terminate called", re.I)

EVENT_STATE = "state"
EVENT_FIGURES = "figures"


@dataclass(frozen=True, slots=True)
class ExitReport:
    """How one run of a loop ended."""

    kind: ExitKind
    cause: str  # one readable line: "killed by SIGKILL", "model /x.onnx not found", "stopped"
    returncode: int | None  # None: the child never started
    signal: str | None = None  # "SIGKILL" when a signal ended it
    oom_killed: bool = False  # the kernel's OOM killer ended it (cgroup v2 only)
    error: str | None = None  # the child's last error line, as it said it
    ran_s: float = 0.0
    figures: dict[str, Any] | None = None  # its final figures, when it could send them


@dataclass(frozen=True, slots=True)
class LoopStatus:
    """A snapshot of one loop, for status calls and events."""

    name: str
    state: LoopState
    pid: int | None
    restarts: int  # automatic restarts since the daemon started
    since: float  # wall-clock time of the last state change
    cause: str | None  # why the last run ended
    last_exit: ExitReport | None
    figures: dict[str, Any] | None  # latest of the current run (LoopFigures.as_dict()); None before the first
    figures_at: float | None  # wall-clock time they arrived
    runtime: str | None  # what the child runs on, e.g. "onnxruntime:CPUExecutionProvider"
    limits: str | None  # the limits in effect for the current or last run
    retry_in_s: float | None  # BACKOFF/FAILED: seconds until the next start


@dataclass(frozen=True, slots=True)
class LoopEvent:
    kind: str  # EVENT_STATE or EVENT_FIGURES
    status: LoopStatus


Listener = Callable[[LoopEvent], None]


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def error_line(lines: Sequence[str], *, dying_only: bool = False) -> str | None:
    """The last line of a stderr tail that looks like an error (`dying_only`: like a dying process's last
    words), or None: an unrelated line would mislead more than no line."""
    pattern = _DYING if dying_only else _ERRORISH
    return next((line.strip() for line in reversed(lines) if pattern.search(line)), None)


def describe_exit(
    returncode: int,
    *,
    stop_requested: bool,
    last_words: dict[str, Any] | None,
    stderr_tail: Sequence[str],
    oom_killed: bool,
    limits: ChildLimits | None,
    memory_max: int | None,
    ran_s: float = 0.0,
) -> ExitReport:
    """Turn a child's exit into a kind and one readable cause. Pure: no I/O."""
    said = last_words.get("error") if last_words else None
    sig = signal_name(-returncode) if returncode < 0 else None
    error = said if isinstance(said, str) and said else error_line(stderr_tail, dying_only=sig is not None)
    figures = last_words.get("figures") if last_words else None
    if stop_requested and (returncode == EXIT_FINISHED or sig in ("SIGTERM", "SIGKILL")):
        cause = "stopped" if sig != "SIGKILL" else "stopped (SIGKILL after the grace period)"
        return ExitReport(ExitKind.FINISHED, cause, returncode, sig, oom_killed, None, ran_s, figures)
    if returncode == EXIT_FINISHED:
        kind, cause = ExitKind.FINISHED, "finished: the source ended"
    elif returncode == EXIT_CONFIG:
        kind, cause = ExitKind.CONFIG, error or "model or configuration error"
    elif returncode == EXIT_CRASHED:
        kind, cause = ExitKind.CRASHED, error or "the loop failed"
    elif sig is not None:
        kind, cause = ExitKind.CRASHED, f"killed by {sig}"
        if oom_killed:
            cause += ": out of memory"
        elif error:
            cause += f": {error}"
    else:
        kind, cause = ExitKind.CRASHED, f"exited with status {returncode}" + (f": {error}" if error else "")
    if memory_max is not None and limits is not None:
        if oom_killed:
            cause += f" (cgroup memory.max {mib(memory_max)})"
        elif limits.rlimit_as is not None and (_MEMORY.search(cause) or sig in ("SIGABRT", "SIGSEGV", "SIGBUS")):
            # Under RLIMIT_AS a failed allocation can also end in an abort or a crash inside native code.
            cause += f" (memory limit: RLIMIT_AS {mib(limits.rlimit_as)})"
    return ExitReport(kind, cause, returncode, sig, oom_killed, error, ran_s, figures)


def row(st: LoopStatus) -> tuple[str, str, float, float, float, int, str]:
    figures = st.figures or {}
    e2e = figures.get("stages", {}).get("end_to_end", {})
    return (
        st.name,
        str(st.state),
        float(figures.get("throughput_fps", 0.0)),
        float(e2e.get("p50_ms", 0.0)),
        float(e2e.get("p99_ms", 0.0)),
        st.restarts,
        st.cause or "",
    )


@dataclass
class _Loop:
    """The supervisor's book on one loop."""

    cfg: LoopConfig
    policy: RestartPolicy
    task: asyncio.Task[None] | None = None
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    pid: int | None = None
    since: float = field(default_factory=time.time)
    last_exit: ExitReport | None = None
    figures: dict[str, Any] | None = None
    figures_at: float | None = None
    runtime: str | None = None
    limits: ChildLimits | None = None
    retry_at: float | None = None  # monotonic
    last_words: dict[str, Any] | None = None
    stderr: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_TAIL))
    emitted: tuple[LoopState, int | None] | None = None
    control: asyncio.Lock = field(default_factory=asyncio.Lock)  # one start or stop at a time


class Supervisor:
    """Starts, stops and restarts loops by name; keeps each one's state, cause and latest figures."""

    def __init__(
        self,
        loops: Iterable[LoopConfig] = (),
        *,
        limits: Limits | None = None,
        figures_every_s: float = FIGURES_EVERY_S,
        stop_grace_s: float = STOP_GRACE_S,
        stable_s: float = STABLE_S,
        cache_dir: Path | None = None,
        python: str = sys.executable,
    ) -> None:
        """`limits`: None detects the mechanism (cgroup v2 or the fallback) on the first start.
        `cache_dir`: engines and runtime caches for the children (the daemon passes one on the data partition)."""
        self._limits = limits
        self._limits_lock: asyncio.Lock | None = None
        self._every = figures_every_s
        self._grace = stop_grace_s
        self._stable = stable_s
        self._cache_dir = cache_dir
        self._python = python
        self._loops: dict[str, _Loop] = {}
        self._listeners: list[Listener] = []
        self._closed = False
        for cfg in loops:
            self.add(cfg)

    # -- configuration and queries -----------------------------------------------------------------

    def add(self, cfg: LoopConfig) -> None:
        """Add a loop, or replace the configuration of a known one (used from its next start)."""
        try:
            policy = RestartPolicy(cfg.restart_min_s, cfg.restart_max_s, self._stable)
        except ValueError as e:
            raise LoopSupervisionError(f"loop {cfg.name!r}: {e}") from None
        known = self._loops.get(cfg.name)
        if known is None:
            self._loops[cfg.name] = _Loop(cfg, policy)
            return
        known.cfg = cfg
        known.policy.min_s, known.policy.max_s = policy.min_s, policy.max_s

    async def remove(self, name: str) -> None:
        """Stop a loop and forget it (a configuration reload dropped it)."""
        await self.stop(name)
        del self._loops[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._loops)

    @property
    def limits(self) -> Limits | None:
        """The mechanism in effect (None until the first start detected it)."""
        return self._limits

    def status(self, name: str) -> LoopStatus:
        return self._snapshot(self._get(name))

    def statuses(self) -> list[LoopStatus]:
        return [self._snapshot(lp) for lp in self._loops.values()]

    def rows(self) -> list[tuple[str, str, float, float, float, int, str]]:
        """(name, state, fps, p50 ms, p99 ms end to end, restarts, cause) per loop: the D-Bus `Loops` property."""
        return [row(st) for st in self.statuses()]

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` on every event; returns the function that unsubscribes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    # -- control -----------------------------------------------------------------------------------

    async def start(self, name: str) -> None:
        """Start a loop (a no-op when it runs; at once and with a fresh back-off when it waits to restart).

        Raises LoopSupervisionError for an unknown loop, bad limits or a GPU that does not exist."""
        lp = self._get(name)
        async with lp.control:
            if self._closed:
                raise LoopSupervisionError(f"loop {name!r}: the supervisor is shutting down")
            if lp.policy.state in (LoopState.STARTING, LoopState.RUNNING):
                return
            await self._halt(lp)
            limits = await self._prepare(lp.cfg)  # raises to the caller: nothing started yet
            lp.policy.start(time.monotonic())
            lp.stop_event = asyncio.Event()
            self._changed(lp)
            lp.task = asyncio.create_task(self._supervise(lp, limits), name=f"pitstop loop {name}")

    async def stop(self, name: str) -> None:
        """Stop a loop and wait until its child is gone (SIGTERM, then SIGKILL after the grace period)."""
        lp = self._get(name)
        async with lp.control:
            lp.policy.stop()
            self._changed(lp)
            await self._halt(lp)

    async def restart(self, name: str) -> None:
        await self.stop(name)
        await self.start(name)

    async def start_all(self) -> None:
        """Start every enabled loop. One that cannot start stays stopped with the reason as its cause; the others
        start."""
        for lp in list(self._loops.values()):
            if not lp.cfg.enabled:
                continue
            try:
                await self.start(lp.cfg.name)
            except LoopSupervisionError as e:
                log.error("%s", e.message)
                lp.last_exit = ExitReport(ExitKind.CONFIG, e.message, None)
                self._changed(lp)

    async def shutdown(self) -> None:
        """Stop every loop, all at once; no child outlives this. Starts are refused from now on."""
        self._closed = True
        results = await asyncio.gather(*(self.stop(name) for name in self._loops), return_exceptions=True)
        for name, result in zip(self._loops, results, strict=True):
            if isinstance(result, BaseException):
                log.error("loop %s: stop failed: %s", name, result)

    # -- internals ---------------------------------------------------------------------------------

    def _get(self, name: str) -> _Loop:
        lp = self._loops.get(name)
        if lp is None:
            known = ", ".join(self._loops) or "none"
            raise LoopSupervisionError(f"no loop named {name!r} (configured: {known})")
        return lp

    async def _halt(self, lp: _Loop) -> None:
        """End the loop's task, if any: it kills the child and leaves the policy STOPPED."""
        lp.stop_event.set()
        task, lp.task = lp.task, None
        if task is not None:
            # Shielded: a stop() whose caller gives up still finishes killing the child.
            await asyncio.shield(task)

    async def _prepare(self, cfg: LoopConfig) -> ChildLimits:
        if self._limits is None:
            self._limits_lock = self._limits_lock or asyncio.Lock()
            async with self._limits_lock:
                if self._limits is None:
                    self._limits = await asyncio.to_thread(Limits.detect)
        return await asyncio.to_thread(self._limits.prepare, cfg)

    async def _supervise(self, lp: _Loop, limits: ChildLimits | None) -> None:
        name = lp.cfg.name
        try:
            while True:
                report = await self._run_once(lp, limits)
                limits = None
                lp.last_exit = report
                lp.pid = None
                decision = lp.policy.exited(time.monotonic(), report.kind)
                level = logging.INFO if report.kind is ExitKind.FINISHED else logging.WARNING
                log.log(level, "loop %s: %s; %s", name, report.cause, decision.state)
                if decision.delay_s is None:
                    self._changed(lp)
                    return
                lp.retry_at = time.monotonic() + decision.delay_s
                self._changed(lp)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lp.stop_event.wait(), decision.delay_s)
                lp.retry_at = None
                if lp.stop_event.is_set():
                    lp.policy.stop()
                    self._changed(lp)
                    return
                lp.policy.backoff_over(time.monotonic())
                self._changed(lp)
        except Exception as e:  # a bug here must not leave the loop unsupervised without saying so
            log.exception("loop %s: supervision failed", name)
            lp.last_exit = ExitReport(ExitKind.CRASHED, f"supervision failed: {type(e).__name__}: {e}", None)
            lp.pid = None
            lp.policy.stop()
            if lp.policy.state is not LoopState.STOPPED:
                lp.policy.exited(time.monotonic(), ExitKind.CRASHED)
            self._changed(lp)

    async def _run_once(self, lp: _Loop, limits: ChildLimits | None) -> ExitReport:
        """One child from spawn to exit."""
        cfg = lp.cfg
        lp.figures = lp.figures_at = lp.runtime = lp.last_words = None
        lp.stderr.clear()
        if limits is None:
            try:
                limits = await self._prepare(cfg)
            except LoopSupervisionError as e:
                return ExitReport(ExitKind.CONFIG, e.message, None)
        lp.limits = limits
        spec = ChildSpec(cfg, limits, os.getpid(), str(self._cache_dir) if self._cache_dir else None)
        started = time.monotonic()
        try:
            child = await _Child.spawn(
                # -X faulthandler: a crash in native code still prints where, for the cause.
                [self._python, "-X", "faulthandler", "-m", "pitstop.daemon.loop_child", "--every", str(self._every)],
                env={**os.environ, **child_env(cfg, limits)},
                spec=spec.to_json().encode(),
            )
        except (OSError, LoopSupervisionError) as e:
            await self._finish_limits(limits)
            message = e.message if isinstance(e, LoopSupervisionError) else (e.strerror or str(e))
            return ExitReport(ExitKind.CRASHED, f"cannot start {self._python}: {message}", None)
        lp.pid = child.pid
        self._changed(lp)
        readers = [
            asyncio.create_task(self._read_events(lp, child.events)),
            asyncio.create_task(self._read_stderr(lp, child.stderr)),
        ]
        try:
            stopping = asyncio.create_task(lp.stop_event.wait())
            either: set[asyncio.Future[Any]] = {child.exited, stopping}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            stop_requested = lp.stop_event.is_set()
            if not child.exited.done():
                await self._terminate(child)
        except asyncio.CancelledError:
            # The daemon going down hard: never leave the child behind. `exited` is a plain future (no task that a
            # cancel-all could cancel), so it can still be awaited here.
            child.signal_group(signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(child.exited), _DRAIN_S)
            raise
        finally:
            _, pending = await asyncio.wait(readers, timeout=_DRAIN_S)
            for t in pending:
                t.cancel()
            child.close()
        oom = await self._finish_limits(limits)
        return describe_exit(
            child.exited.result(),
            stop_requested=stop_requested,
            last_words=lp.last_words,
            stderr_tail=list(lp.stderr),
            oom_killed=oom,
            limits=limits,
            memory_max=cfg.memory_max,
            ran_s=time.monotonic() - started,
        )

    async def _finish_limits(self, limits: ChildLimits) -> bool:
        if self._limits is None or limits.mechanism == FALLBACK:
            return False
        return await asyncio.to_thread(self._limits.finish, limits)

    async def _terminate(self, child: _Child) -> None:
        child.signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(child.exited), self._grace)
        except TimeoutError:
            log.warning("loop child %d: no exit %.0f s after SIGTERM; SIGKILL", child.pid, self._grace)
            child.signal_group(signal.SIGKILL)
            await child.exited

    async def _read_events(self, lp: _Loop, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # longer than _LINE_LIMIT: skipped
                continue
            if not line:
                return
            try:
                msg = json.loads(line)
                event = msg["event"]
            except (ValueError, KeyError, TypeError):
                log.warning("loop %s: unreadable line from the child: %.200r", lp.cfg.name, line)
                continue
            if event == "started":
                lp.runtime = msg.get("runtime")
                if lp.policy.state is LoopState.STARTING:
                    lp.policy.running(time.monotonic())
                self._changed(lp)
            elif event == "figures":
                self._figures(lp, msg.get("figures"))
            elif event == "exit":
                lp.last_words = msg
                if msg.get("figures") is not None:
                    self._figures(lp, msg["figures"])

    def _figures(self, lp: _Loop, figures: Any) -> None:
        if not isinstance(figures, dict):
            return
        lp.figures = figures
        lp.figures_at = time.time()
        self._emit(EVENT_FIGURES, lp)

    async def _read_stderr(self, lp: _Loop, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await reader.readline()
            except ValueError:
                continue
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                lp.stderr.append(line)
                log.info("loop %s: %s", lp.cfg.name, line)

    def _changed(self, lp: _Loop) -> None:
        """Emit a state event if the state or the child changed since the last one."""
        key = (lp.policy.state, lp.pid)
        if key != lp.emitted:
            lp.emitted = key
            lp.since = time.time()
            self._emit(EVENT_STATE, lp)

    def _emit(self, kind: str, lp: _Loop) -> None:
        if not self._listeners:
            return
        event = LoopEvent(kind, self._snapshot(lp))
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("loop event listener %r failed", listener)

    def _snapshot(self, lp: _Loop) -> LoopStatus:
        retry = max(0.0, lp.retry_at - time.monotonic()) if lp.retry_at is not None else None
        return LoopStatus(
            name=lp.cfg.name,
            state=lp.policy.state,
            pid=lp.pid,
            restarts=lp.policy.restarts,
            since=lp.since,
            cause=lp.last_exit.cause if lp.last_exit else None,
            last_exit=lp.last_exit,
            figures=lp.figures,
            figures_at=lp.figures_at,
            runtime=lp.runtime,
            limits=lp.limits.describe() if lp.limits else None,
            retry_in_s=retry,
        )


class _Child:
    """One spawned loop child: its spec on stdin, its JSON lines and stderr as stream readers, its exit as a future.

    Not asyncio's subprocess transport: cancelled while spawning, that one can wait forever for pipes that never
    connect (CPython 3.11, when asyncio.run cancels every task at once). Here the spawn is one synchronous
    fork/exec (as asyncio's is), the spec goes through a pipe filled before the child starts, and the exit is
    watched through a pidfd, so nothing needs a task of its own.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        events: asyncio.StreamReader,
        stderr: asyncio.StreamReader,
        transports: list[asyncio.BaseTransport],
        exited: asyncio.Future[int],
    ) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.events = events
        self.stderr = stderr
        self.exited = exited
        self._transports = transports

    @classmethod
    async def spawn(cls, argv: list[str], *, env: dict[str, str], spec: bytes) -> _Child:
        """Raises OSError when the child cannot be started, LoopSupervisionError for a spec too big for a pipe."""
        loop = asyncio.get_running_loop()
        spec_r, spec_w = os.pipe()
        err_r, err_w = os.pipe()
        events_r, events_w = os.pipe()
        theirs = [spec_r, err_w, events_w]
        try:
            try:
                os.set_blocking(spec_w, False)
                written = os.write(spec_w, spec)
            except BlockingIOError:
                written = 0
            finally:
                os.close(spec_w)
            if written != len(spec):
                raise LoopSupervisionError(f"the loop's spec ({len(spec)} bytes) does not fit in a pipe")
            proc = subprocess.Popen(
                [*argv, "--figures-fd", str(events_w)],
                stdin=spec_r,
                stderr=err_w,
                pass_fds=(events_w,),
                env=env,
                start_new_session=True,  # its own process group: a stop reaches whatever it started
            )
        except BaseException:
            for fd in (err_r, events_r):
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        exited: asyncio.Future[int] = loop.create_future()
        _watch_exit(loop, proc, exited)
        # The transports close these files; closing one again below is a no-op, never a stray close of a reused fd.
        files = {"stderr": os.fdopen(err_r, "rb", buffering=0), "events": os.fdopen(events_r, "rb", buffering=0)}
        transports: list[asyncio.BaseTransport] = []
        readers: dict[str, asyncio.StreamReader] = {}
        try:
            for name, f in files.items():
                reader = asyncio.StreamReader(limit=_LINE_LIMIT)
                transport, _ = await loop.connect_read_pipe(lambda r=reader: asyncio.StreamReaderProtocol(r), f)  # type: ignore[misc]
                transports.append(transport)
                readers[name] = reader
        except BaseException:  # cancelled in between: the child must not live on unwatched
            _killpg(proc.pid, signal.SIGKILL)
            for t in transports:
                t.close()
            for f in files.values():
                f.close()
            raise
        return cls(proc, readers["events"], readers["stderr"], transports, exited)

    def signal_group(self, sig: int) -> None:
        if not self.exited.done():
            _killpg(self.pid, sig)

    def close(self) -> None:
        for t in self._transports:
            t.close()


def _watch_exit(loop: asyncio.AbstractEventLoop, proc: subprocess.Popen[bytes], exited: asyncio.Future[int]) -> None:
    """Resolve `exited` with the child's return code once it has exited, and reap it."""

    def reap() -> bool:
        code = proc.poll()
        if code is None:
            return False
        if not exited.done():
            exited.set_result(code)
        return True

    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:  # before Linux 5.3: look ten times a second

        async def poll() -> None:
            while not reap():
                await asyncio.sleep(0.1)

        task = loop.create_task(poll())
        exited.add_done_callback(lambda _: task.cancel())
        return

    def readable() -> None:
        if reap():
            loop.remove_reader(pidfd)
            os.close(pidfd)

    loop.add_reader(pidfd, readable)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
