"""The inference loop: source → preprocess → infer → postprocess → sink, the stages overlapped.

Four threads hand over through bounded queues. The heavy work of every stage releases the GIL
(decoding in FFmpeg, numpy kernels, the runtime's own threads), so the stages really overlap.

Buffers: the pipeline's slots (input tensor + output tensors, allocated once by the runtime) cycle
free → preprocess → infer → postprocess → free. A slot is the unit of back-pressure: when all are
in flight, preprocessing waits. Frames waiting for a slot sit in a channel that is lossless for
files (the source blocks) and latest-frame-wins for live sources (the older frame is dropped and
counted), so a live loop always works on the newest picture.

A stage that raises stops the loop; `run()` then raises LoopError naming the stage and the cause,
and `figures().error` says the same to the daemon.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from typing import Any, Protocol

from pitstop.inference.errors import InferenceError, LoopError
from pitstop.inference.frames import Frame, Result, Sink, Source
from pitstop.inference.stats import LoopFigures, LoopStats

log = logging.getLogger(__name__)

_POLL = 0.05  # how often a waiting stage looks at the stop flag
_END = object()


class Slot(Protocol):
    """One set of preallocated buffers and the bookkeeping of the frame in it."""

    frame_index: int
    captured_ns: int
    origin: str


class Pipeline(Protocol):
    """One model ready to run (runtime configured, processing planned): what the loop drives."""

    @property
    def runtime_name(self) -> str: ...

    def new_slot(self) -> Any: ...

    def preprocess(self, frame: Frame, slot: Any) -> None: ...

    def infer(self, slot: Any) -> None: ...

    def postprocess(self, slot: Any) -> Result: ...

    def close(self) -> None: ...


class _Latest:
    """A one-place channel where a new item replaces the waiting one (live sources).

    The end of the stream never replaces a waiting frame: that frame is still delivered, then the end.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._full = False
        self._ended = False

    def put(self, item: Any) -> bool:
        """Store `item`; True when it replaced one that was never taken (a drop)."""
        with self._cond:
            if item is _END:
                self._ended = True
                self._cond.notify()
                return False
            dropped = self._full
            self._item, self._full = item, True
            self._cond.notify()
            return dropped

    def get(self, timeout: float) -> Any:
        with self._cond:
            if not (self._full or self._ended) and not self._cond.wait_for(lambda: self._full or self._ended, timeout):
                raise queue.Empty
            if not self._full:
                return _END
            item, self._item, self._full = self._item, None, False
            return item

    def qsize(self) -> int:
        return int(self._full)


class Loop:
    """Runs one pipeline over one source into one sink until the source ends or stop() is called."""

    def __init__(
        self,
        source: Source,
        pipeline: Pipeline,
        sink: Sink,
        *,
        slots: int = 3,
        max_frames: int | None = None,
        live: bool | None = None,
        name: str = "loop",
        switch_interval_s: float | None = 0.0005,
        close_pipeline: bool = True,
    ) -> None:
        if slots < 2:
            raise InferenceError("a loop needs at least 2 slots to overlap its stages")
        self.name = name
        self._source = source
        self._sink = sink
        self._pipe = pipeline
        self._max_frames = max_frames
        self.live = source.live if live is None else live
        self.stats = LoopStats(pipeline.runtime_name)
        self._stop = threading.Event()
        self._failure: LoopError | None = None
        self._fail_lock = threading.Lock()
        self._frames: _Latest | queue.Queue[Any] = _Latest() if self.live else queue.Queue(maxsize=2)
        self._free: queue.Queue[Any] = queue.Queue()
        self._ready: queue.Queue[Any] = queue.Queue()
        self._done: queue.Queue[Any] = queue.Queue()
        self._slot_count = slots
        self._slots = [pipeline.new_slot() for _ in range(slots)]
        for s in self._slots:
            self._free.put(s)
        self._pending: Pipeline | None = None
        self._switch_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._finished = threading.Event()
        self._switch_s = switch_interval_s
        self._close_pipeline = close_pipeline  # False: the caller reuses the pipeline after the loop

    # -- control ---------------------------------------------------------------------------------

    def start(self) -> None:
        stages = (
            ("source", self._run_source),
            ("preprocess", self._run_preprocess),
            ("infer", self._run_infer),
            ("postprocess", self._run_postprocess),
        )
        self.stats.started = time.monotonic()
        if self._switch_s is not None:
            # A stage returning from a GIL-free call (ONNX Runtime, TensorRT, FFmpeg) waits for the GIL
            # up to the switch interval (5 ms by default) while another stage runs Python code; at
            # hundreds of frames per second that wait is most of the loop's overhead. Process-wide:
            # a loop runs in its own process (DESIGN.md "Inference").
            sys.setswitchinterval(self._switch_s)
        for stage, fn in stages:
            t = threading.Thread(target=self._guard, args=(stage, fn), name=f"{self.name}-{stage}", daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the loop to end; True when it has. Closes source, sink and pipeline once ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                return False
        if not self._finished.is_set():
            self._finished.set()
            self.stats.ended = time.monotonic()
            with self._switch_lock:
                pending, self._pending = self._pending, None
            closers = [self._source.close, self._sink.close]
            if self._close_pipeline:
                closers.append(self._pipe.close)
            if pending is not None:
                closers.append(pending.close)  # asked for, never taken: still ours to close
            for close in closers:
                try:
                    close()
                except Exception as e:
                    log.warning("%s: closing failed: %s", self.name, e)
        return True

    def run(self) -> LoopFigures:
        """Start, wait for the end, and return the figures; raise LoopError if a stage failed."""
        self.start()
        try:
            while not self.wait(timeout=0.5):
                pass
        except KeyboardInterrupt:
            self.stop()
            self.wait()
            raise
        if self._failure is not None:
            raise self._failure
        return self.figures()

    def figures(self) -> LoopFigures:
        return self.stats.snapshot()

    @property
    def failure(self) -> LoopError | None:
        return self._failure

    def switch(self, pipeline: Pipeline) -> None:
        """Move to `pipeline` (already opened: its engine built) at the next frame boundary.

        Frames in flight finish on the old pipeline; the old one is closed once its slots are back.
        """
        with self._switch_lock:
            if self._finished.is_set():
                pipeline.close()
                raise LoopError(f"{self.name}: the loop has ended; it cannot switch pipelines")
            if self._pending is not None:
                self._pending.close()
            self._pending = pipeline

    # -- stages ----------------------------------------------------------------------------------

    def _guard(self, stage: str, fn: Any) -> None:
        try:
            fn()
        except BaseException as e:
            self._fail(stage, e)

    def _fail(self, stage: str, e: BaseException) -> None:
        message = e.message if isinstance(e, InferenceError) else f"{type(e).__name__}: {e}"
        with self._fail_lock:
            if self._failure is None:
                self._failure = LoopError(f"{self.name}: {stage} stage failed: {message}")
                self.stats.error = self._failure.message
                log.error("%s", self._failure.message, exc_info=not isinstance(e, InferenceError))
        self._stop.set()

    def _get(self, q: Any) -> Any:
        """The next item, or _END once stop() was called."""
        while True:
            if self._stop.is_set():
                return _END
            try:
                return q.get(timeout=_POLL)
            except queue.Empty:
                continue

    def _put(self, q: queue.Queue[Any], item: Any) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def _run_source(self) -> None:
        ring = self.stats.stages["source"]
        gauge = self.stats.queues["frames"]
        count = 0
        while not self._stop.is_set():
            if self._max_frames is not None and count >= self._max_frames:
                break
            t0 = time.perf_counter()
            frame = self._source.read()
            if frame is None:
                break
            ring.add(time.perf_counter() - t0)
            count += 1
            self.stats.frames_in += 1
            gauge.sample(self._frames.qsize())
            if isinstance(self._frames, _Latest):
                if self._frames.put(frame):
                    self.stats.drops += 1
            elif not self._put(self._frames, frame):
                return
        if isinstance(self._frames, _Latest):
            self._frames.put(_END)
        else:
            self._put(self._frames, _END)

    def _take_pending(self) -> None:
        with self._switch_lock:
            new, self._pending = self._pending, None
        if new is None:
            return
        # Wait for every old slot to come back, so nothing in flight still uses the old runtime.
        old: list[Any] = []
        while len(old) < self._slot_count:
            item = self._get(self._free)
            if item is _END:
                new.close()
                return
            old.append(item)
        self._pipe.close()
        self._pipe = new
        self.stats.runtime = new.runtime_name
        self._slots = [new.new_slot() for _ in range(self._slot_count)]
        for s in self._slots:
            self._free.put(s)
        log.info("%s: switched to %s", self.name, new.runtime_name)

    def _run_preprocess(self) -> None:
        ring = self.stats.stages["preprocess"]
        gauge = self.stats.queues["ready"]
        while True:
            # A free slot first, then the frame: for a live source the frame taken is then the newest,
            # not one that waited for a slot while newer ones were dropped behind it.
            slot = self._get(self._free)
            if slot is _END:
                break
            frame = self._get(self._frames)
            if frame is _END:
                break
            if self._pending is not None:
                # Switch at this frame boundary: this frame already goes to the new pipeline.
                self._free.put(slot)
                self._take_pending()
                slot = self._get(self._free)
                if slot is _END:
                    break
            t0 = time.perf_counter()
            self._pipe.preprocess(frame, slot)
            ring.add(time.perf_counter() - t0)
            slot.frame_index, slot.captured_ns, slot.origin = frame.index, frame.captured_ns, frame.origin
            gauge.sample(self._ready.qsize())
            self._ready.put((self._pipe, slot))
        self._ready.put(_END)

    def _run_infer(self) -> None:
        ring = self.stats.stages["infer"]
        gauge = self.stats.queues["done"]
        while True:
            item = self._get(self._ready)
            if item is _END:
                break
            pipe, slot = item
            t0 = time.perf_counter()
            pipe.infer(slot)
            ring.add(time.perf_counter() - t0)
            gauge.sample(self._done.qsize())
            self._done.put(item)
        self._done.put(_END)

    def _run_postprocess(self) -> None:
        post = self.stats.stages["postprocess"]
        sink_ring = self.stats.stages["sink"]
        e2e = self.stats.stages["end_to_end"]
        while True:
            item = self._get(self._done)
            if item is _END:
                break
            pipe, slot = item
            t0 = time.perf_counter()
            result = pipe.postprocess(slot)
            t1 = time.perf_counter()
            post.add(t1 - t0)
            self._free.put(slot)  # the result holds no reference into the slot's buffers
            try:
                self._sink.write(result)
            except BaseException as e:
                self._fail("sink", e)
                return
            t2 = time.perf_counter()
            sink_ring.add(t2 - t1)
            e2e.add(max(0.0, (time.monotonic_ns() - result.captured_ns) / 1e9))
            self.stats.delivered(time.monotonic())
        self._stop.set()  # the end of the stream ends every stage
