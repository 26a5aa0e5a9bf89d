"""A rootfs payload's chunks, verified and in order, from the active slot where it holds them and from the
bundle over HTTP for the rest (docs/delta.md).

Like `PayloadStream`, chunks move in batches of about 1 MiB through the verify pool: a batch of seed
chunks is read and hashed there, a batch of downloaded frames decompressed and checked there; the caller's
thread downloads and hands out. A seed chunk that fails its check is downloaded on its own instead.
The payload's SHA-256 is checked at the end, as for a full install.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from pitstop.ota.bundle_reader import BATCH_BYTES, BATCH_CHUNKS, decompress_batch, read_exact, update_all, workers
from pitstop.ota.chunks import decompress_chunk
from pitstop.ota.delta_plan import Plan
from pitstop.ota.errors import PayloadError
from pitstop.ota.http_source import HttpSource
from pitstop.ota.manifest import Payload
from pitstop.ota.seed import Seed, read_chunk

_Result = Sequence[bytes | None]  # None: a seed chunk that failed its check


def _read_seed(fd: int, offsets: list[int], lengths: list[int], ids: list[bytes], digest: str) -> _Result:
    return [read_chunk(fd, o, n, cid, digest) for o, n, cid in zip(offsets, lengths, ids, strict=True)]


class DeltaStream:
    """Iterate to the end: the payload-wide check runs after the last chunk (PayloadError)."""

    def __init__(
        self,
        src: HttpSource,
        payload: Payload,
        ids: tuple[bytes, ...],
        plan: Plan,
        seed: Seed,
        pool: ThreadPoolExecutor,
    ) -> None:
        self._src = src
        self.payload = payload
        self._ids = ids
        self.plan = plan
        self.seed = seed
        self._pool = pool
        self.seeded_bytes = 0  # uncompressed bytes taken from the seed
        self.fallback_chunks = 0  # seed chunks that failed their check and were downloaded

    def _batches(self, fd: int) -> Iterator[tuple[int, Future[_Result]]]:
        plan, p, ids = self.plan, self.payload, self._ids
        fetches = {f.first: f for f in plan.fetches}
        firsts = sorted(fetches)
        n, i, fetch_last = plan.chunks, 0, 0
        while i < n:
            if i in fetches:
                f = fetches[i]
                fetch_last = f.last
                self._src.window(f.start, f.end)
            downloading = i < fetch_last
            # A batch stays inside one fetch, or inside one run of seed chunks between fetches.
            limit = fetch_last if downloading else next((k for k in firsts[bisect.bisect_right(firsts, i) :]), n)
            j, total = i, 0
            while j < limit and j - i < BATCH_CHUNKS and (total < BATCH_BYTES or j == i):
                total += plan.sizes[j] if downloading else plan.lengths[j]
                j += 1
            lengths = list(plan.lengths[i:j])
            if downloading:
                buf = read_exact(self._src, total, f"payload {p.name!r}")
                frames, pos = [], 0
                for k in range(i, j):
                    frames.append(buf[pos : pos + plan.sizes[k]])
                    pos += plan.sizes[k]
                fut: Future[_Result] = self._pool.submit(
                    decompress_batch, frames, lengths, list(ids[i:j]), p.chunk_digest
                )
            else:
                offsets = [o for o in plan.seed[i:j] if o is not None]
                fut = self._pool.submit(_read_seed, fd, offsets, lengths, list(ids[i:j]), p.chunk_digest)
            yield i, fut
            i = j

    def _download_one(self, k: int) -> bytes:
        """Chunk k from the bundle, outside the plan (its seed copy failed its check)."""
        src, plan = self._src, self.plan
        resume = (src.tell(), src.window_end)
        src.window(plan.starts[k], plan.starts[k] + plan.sizes[k])
        frame = read_exact(src, plan.sizes[k], f"payload {self.payload.name!r}")
        src.window(*resume)
        self.fallback_chunks += 1
        try:
            return decompress_chunk(frame, plan.lengths[k], self._ids[k], self.payload.chunk_digest)
        except PayloadError as e:
            raise PayloadError(f"payload {self.payload.name!r}: {e.message}") from None

    def __iter__(self) -> Iterator[bytes]:
        p = self.payload
        full = hashlib.sha256()
        pending: collections.deque[tuple[int, Future[_Result]]] = collections.deque()
        depth = 2 * workers()
        fd = os.open(self.seed.device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="hash") as hasher:
                last: Future[None] | None = None
                try:
                    for item in self._batches(fd):
                        pending.append(item)
                        while len(pending) > depth:
                            chunks = self._settle(*pending.popleft())
                            last = hasher.submit(update_all, full, chunks)
                            yield from chunks
                    while pending:
                        chunks = self._settle(*pending.popleft())
                        last = hasher.submit(update_all, full, chunks)
                        yield from chunks
                finally:
                    for _, fut in pending:
                        fut.cancel()
                if last is not None:
                    last.result()
        finally:
            os.close(fd)
        if full.hexdigest() != p.sha256:
            raise PayloadError(f"payload {p.name!r} does not match its SHA-256 in the signed manifest")

    def _settle(self, first: int, fut: Future[_Result]) -> list[bytes]:
        try:
            got = fut.result()
        except PayloadError as e:
            raise PayloadError(f"payload {self.payload.name!r}: {e.message}") from None
        out = []
        for k, c in enumerate(got, first):
            if c is None:
                c = self._download_one(k)
            elif self.plan.seed[k] is not None:
                self.seeded_bytes += len(c)
            out.append(c)
        return out
