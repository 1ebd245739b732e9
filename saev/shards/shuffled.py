"""Shuffled training loader: large sequential reads into a shuffle buffer, batches of tokens.

The token stream of one epoch is defined without reference to thread timing, so it is
deterministic given the seed and a run can restart at any token position:

1. The chosen images (the train split) are cut into *chunks*: runs of consecutive images
   within one shard, about `chunk_mb` of the chosen layer each. A chunk is read with a few
   large `preadv` calls (one per run of consecutive chosen images when the shard holds one
   layer, else one per image) straight into the window's buffer; they release the GIL, so
   `n_threads` readers overlap.
2. Each epoch permutes the chunk order (seeded by `(seed, epoch)`) and groups consecutive
   chunks into *windows* of about `buffer_mb` of float32 tokens.
3. Each window's tokens are permuted (seeded by `(seed, epoch, window)`); the stream is the
   concatenation of permuted windows over epochs, and batch `b` is stream tokens
   `[b*B, (b+1)*B)`. Batches cross window and epoch boundaries, so none is dropped.

A background thread plans windows (reading the next window while the current one is
served); each batch is one `np.take` of its shuffled row indices from the window buffer
(which also drops unselected tokens such as CLS), run on a second thread pool into a
float32 tensor, pinned when CUDA is used. Data is copied twice: disk to buffer, buffer to
batch (float16 shards go through a small per-thread float16 scratch batch that stays in
cache, converted to float32 by torch). The window buffers are kept by the loader between
`batches()` calls, because first-touching fresh memory costs a page fault and a page clear;
unpinned batch memory is recycled for the same reason (see `_batch_array`).

Against a sequential reader of the same files (benchmarks/loader.py), the one extra cost is
the gather itself: rows at random offsets of a buffer far larger than the caches copy about
three times slower than contiguous rows, so on one core the loader does ~0.6x the sequential
reader's work per second; it makes that up by running reads and gathers on several cores.

Everything on the hot path runs on the calling thread: numpy's `take` is single-threaded and
torch copies are cut below its intra-op grain size, so no call wakes torch's OpenMP pool from
a worker thread. (Waking it from several threads at once oversubscribes the cores; on a busy
2-core machine that made a plain `copy_` ten times slower.)
"""

import concurrent.futures
import dataclasses
import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from jaxtyping import Float, Int

from saev.errors import UserError
from saev.shards.reader import Shards, Tokens, all_finite, check_finite

logger = logging.getLogger("saev.shards.shuffled")

# Elements per torch copy: below at::internal::GRAIN_SIZE (32768), so torch runs the copy on
# the calling thread instead of its OpenMP pool (see the module docstring).
_COPY_ELEMS = 32768


def copy_as_float32(dst: np.ndarray, src: np.ndarray) -> None:
    """`dst[...] = src` for float32 `dst` [rows, d] and float32 or float16 `src` [rows, d]
    (any strides), single-threaded. float16 goes through torch, whose SIMD conversion is
    several times faster than numpy's."""
    if src.dtype == np.float32:
        np.copyto(dst, src)
        return
    step = max(1, _COPY_ELEMS // (src.shape[-1] or 1) - 1)
    td, ts = torch.from_numpy(dst), torch.from_numpy(src)
    for a in range(0, src.shape[0], step):
        td[a : a + step].copy_(ts[a : a + step])


def split_images(
    n_imgs: int, eval_frac: float, seed: int
) -> tuple[Int[np.ndarray, " n_train"], Int[np.ndarray, " n_eval"]]:
    """A seeded split of image indices into sorted train and eval arrays.

    With 0 < eval_frac < 1 and at least two images, both sides get at least one image.
    """
    if not 0.0 <= eval_frac < 1.0:
        raise UserError(f"eval_frac={eval_frac}; expected 0 <= eval_frac < 1.")
    n_eval = round(eval_frac * n_imgs)
    if eval_frac > 0 and n_imgs >= 2:
        n_eval = min(max(n_eval, 1), n_imgs - 1)
    perm = np.random.default_rng([seed, 0x5E11]).permutation(n_imgs)
    return np.sort(perm[n_eval:]).astype(np.int64), np.sort(perm[:n_eval]).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Chunk:
    shard_i: int
    local: np.ndarray
    """Chosen images of the chunk, as indices within the shard (sorted)."""


@dataclasses.dataclass
class Stats:
    """Loader throughput so far (read by the trainer and the benchmark)."""

    tokens: int = 0
    bytes_read: int = 0
    read_s: float = 0.0
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.started, 1e-9)


class ShuffledLoader:
    """Batches `[batch_size, d_vit]` float32 of one layer and token selection of chosen images."""

    def __init__(
        self,
        shards: Shards,
        *,
        layer: int,
        tokens: Tokens = "patches",
        batch_size: int,
        imgs: Int[np.ndarray, " n"] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        n_threads: int = 4,
        chunk_mb: float = 32.0,
        buffer_mb: float = 512.0,
        pin_memory: bool | None = None,
        prefetch_batches: int = 8,
    ):
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size}; expected >= 1.")
        if n_threads < 1:
            raise UserError(f"n_threads={n_threads}; expected >= 1.")
        self.shards, self.md = shards, shards.md
        self.layer_pos = shards.layer_pos(layer)
        self.tok_slice = shards.token_slice(tokens)
        self.n_tok = self.tok_slice.stop - self.tok_slice.start
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.n_threads = n_threads
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_batches = prefetch_batches
        self.stats = Stats()

        imgs = np.arange(shards.n_imgs) if imgs is None else np.asarray(imgs, dtype=np.int64)
        if imgs.size == 0:
            raise UserError(f"{shards.root}: no images selected for the loader.")
        self.imgs = np.sort(imgs)
        md = self.md
        # One image's block of the chosen layer, all stored tokens, in bytes.
        self.block_bytes = md.n_tokens_per_img * md.d_vit * md.np_dtype.itemsize
        chunk_imgs = max(1, int(chunk_mb * 2**20) // self.block_bytes)
        self.chunks = self._make_chunks(chunk_imgs)
        self.chunk_tokens = np.array([c.local.size * self.n_tok for c in self.chunks])
        self.n_tokens = int(self.chunk_tokens.sum())
        """Tokens in one epoch."""
        self.window_tokens = max(int(buffer_mb * 2**20) // (4 * md.d_vit), batch_size)
        self._idle_buffers: list[list] = []  # window buffers kept between batches() calls
        self._scratch = threading.local()  # per gather thread: float16 batch before conversion
        self._pool: list[np.ndarray] = []  # batch slabs, see _batch_array
        self._pool_lock = threading.Lock()

    def _make_chunks(self, chunk_imgs: int) -> list[Chunk]:
        per = self.md.n_imgs_per_shard
        chunks = []
        shard_of = self.imgs // per
        for shard_i in np.unique(shard_of):
            local = self.imgs[shard_of == shard_i] - shard_i * per
            # Cut the shard's physical image range into pieces of chunk_imgs images.
            piece = local // chunk_imgs
            for p in np.unique(piece):
                chunks.append(Chunk(int(shard_i), local[piece == p]))
        return chunks

    # The deterministic stream.

    def windows(self, epoch: int) -> list[list[int]]:
        """Chunk indices of each window of `epoch`, in stream order."""
        order = np.arange(len(self.chunks))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))
        windows, cur, n = [], [], 0
        for c in order:
            cur.append(int(c))
            n += int(self.chunk_tokens[c])
            if n >= self.window_tokens:
                windows.append(cur)
                cur, n = [], 0
        if cur:
            windows.append(cur)
        return windows

    def _window_perm(self, epoch: int, window: int, n: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        # numpy, not torch.randperm: that wakes torch's OpenMP pool, whose threads then spin
        # for milliseconds after every window (9 ms of CPU per 60k-token window on 2 cores).
        return np.random.default_rng([self.seed, epoch, window]).permutation(n)

    # Reading.

    def _read_chunk(self, chunk: Chunk, dst: np.ndarray) -> None:
        """Read the chosen layer of the chunk's images into `dst` [imgs, n_tokens * d_vit]."""
        md = self.md
        t0 = time.perf_counter()
        path = self.shards.root / md.shard_file(chunk.shard_i)
        fd = os.open(path, os.O_RDONLY)
        try:
            img_bytes = md.bytes_per_img
            if md.n_layers == 1:
                # Runs of consecutive images are contiguous on disk: one read per run.
                breaks = np.flatnonzero(np.diff(chunk.local) != 1) + 1
                starts = np.concatenate([[0], breaks])
                stops = np.concatenate([breaks, [chunk.local.size]])
                for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
                    offset = int(chunk.local[a]) * img_bytes
                    _pread_into(fd, memoryview(dst[a:b]).cast("B"), offset, path)
            else:
                for j, img in enumerate(chunk.local.tolist()):
                    offset = img * img_bytes + self.layer_pos * self.block_bytes
                    _pread_into(fd, memoryview(dst[j]).cast("B"), offset, path)
        finally:
            os.close(fd)
        # Non-finite input would stop every SAE at once: name where it is instead. Two
        # reductions over the chunk just read (see all_finite): about 1.5 ms per 32 MiB on one
        # core, a tenth of the loader's CPU time per token. (Checking each piece right after
        # its read, while in cache, measured no faster: the extra reads cost as much.)
        check_finite(
            self.shards,
            chunk.shard_i,
            chunk.local,
            dst.reshape(dst.shape[0], md.n_tokens_per_img, md.d_vit),
            self.layer_pos,
        )
        self.stats.bytes_read += dst.nbytes
        self.stats.read_s += time.perf_counter() - t0

    def _read_window(self, pool: ThreadPoolExecutor, chunk_ids: list[int], buf: np.ndarray):
        """Start reading a window's chunks straight into `buf`; returns a function that waits
        for them and gives (buffer [rows, d_vit], row index of each chosen token)."""
        md = self.md
        sizes = [self.chunks[c].local.size for c in chunk_ids]
        n_imgs = sum(sizes)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        futures = [
            pool.submit(self._read_chunk, self.chunks[c], buf[offsets[j] : offsets[j + 1]])
            for j, c in enumerate(chunk_ids)
        ]

        def result() -> tuple[np.ndarray, np.ndarray]:
            for f in futures:
                f.result()
            toks = np.arange(self.tok_slice.start, self.tok_slice.stop)
            rows = (np.arange(n_imgs)[:, None] * md.n_tokens_per_img + toks[None]).ravel()
            return buf[:n_imgs].reshape(-1, md.d_vit), rows

        return result

    def _window_capacity(self) -> int:
        """Most images a window can hold: it closes once it reaches window_tokens."""
        max_chunk = max(c.local.size for c in self.chunks)
        return min(self.imgs.size, -(-self.window_tokens // self.n_tok) + max_chunk)

    def _gather(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> list[torch.Tensor]:
        """One batch: the rows `idx` of each window buffer, as float32 (pinned if asked).

        Returned in a one-item list that the consumer empties: the future stays referenced
        (to know when its window buffer is free) long after the batch is used, and must not
        keep the batch alive that long."""
        n = sum(idx.size for _, idx in parts)
        if self.pin_memory:  # torch's pinned allocator caches and reuses these blocks
            out = torch.empty((n, self.md.d_vit), dtype=torch.float32, pin_memory=True)
            dst = out.numpy()
        else:
            dst = self._batch_array(n)
            out = torch.from_numpy(dst)
        i = 0
        for buf, idx in parts:
            # mode="clip": with the default mode="raise", numpy gathers into a temporary and
            # copies that into `out` (a second copy of the batch). The indices are in range.
            if buf.dtype == np.float32:
                np.take(buf, idx, axis=0, out=dst[i : i + idx.size], mode="clip")
            else:
                # Random rows are the costly part: gather them at half the bytes, then
                # convert the cache-resident scratch.
                scratch = getattr(self._scratch, "buf", None)
                if scratch is None or scratch.shape[0] < idx.size:
                    scratch = self._scratch.buf = np.empty((idx.size, self.md.d_vit), buf.dtype)
                np.take(buf, idx, axis=0, out=scratch[: idx.size], mode="clip")
                copy_as_float32(dst[i : i + idx.size], scratch[: idx.size])
            i += idx.size
        return [out]

    def _batch_array(self, n: int) -> np.ndarray:
        """Memory for one unpinned float32 batch. Batches are allocated on gather threads and
        freed on the consumer's, so malloc hands their memory back to the kernel and every
        fresh batch page-faults (about a tenth of the loader's CPU time). Full batches are
        therefore views of pooled slabs: a tensor made from the view keeps the view, and so
        the slab, referenced, so a slab whose only references are the pool's is free."""
        if n != self.batch_size:
            return np.empty((n, self.md.d_vit), dtype=np.float32)
        with self._pool_lock:
            for slab in self._pool:
                # References: the pool's list, the loop variable, getrefcount's argument.
                if sys.getrefcount(slab) == 3:
                    return slab[:]
            slab = np.empty((n, self.md.d_vit), dtype=np.float32)
            # Enough for the queue, the batches being gathered and a few held by the consumer.
            if len(self._pool) < self.prefetch_batches + self.n_threads + 4:
                self._pool.append(slab)
            return slab[:]

    # Iteration.

    def batches(
        self, start: int = 0, n_epochs: int | None = None
    ) -> Iterator[Float[torch.Tensor, "batch d_vit"]]:
        """Batches from stream token `start` on; forever, or until `n_epochs` epochs are served.

        With `n_epochs`, the final batch may be smaller than `batch_size`.
        """
        q: queue.Queue = queue.Queue(maxsize=self.prefetch_batches)
        stop = threading.Event()
        thread = threading.Thread(
            target=self._produce, args=(start, n_epochs, q, stop), daemon=True, name="saev-loader"
        )
        thread.start()
        last_log = time.perf_counter()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                item = item.result().pop()
                self.stats.tokens += item.shape[0]
                now = time.perf_counter()
                if now - last_log > 30:
                    last_log = now
                    logger.info(
                        "loader: %.0f tokens/s, %.1f MiB/s read",
                        self.stats.tokens_per_s,
                        self.stats.bytes_read / 2**20 / (now - self.stats.started),
                    )
                yield item
        finally:
            stop.set()
            # Unblock a producer waiting on a full queue, then let it exit.
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)

    def _produce(self, start: int, n_epochs: int | None, q: queue.Queue, stop: threading.Event):
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        # Take the kept window buffers (a second live iterator allocates its own).
        buffers, self._idle_buffers = self._idle_buffers, []
        try:
            # Reads and gathers get their own pools, so batches of the current window are
            # assembled while the next window's reads are in flight. Both release the GIL.
            with (
                ThreadPoolExecutor(self.n_threads, thread_name_prefix="saev-read") as reads,
                ThreadPoolExecutor(self.n_threads, thread_name_prefix="saev-batch") as gathers,
            ):
                for future in self._stream(reads, gathers, start, n_epochs, stop, buffers):
                    if not put(future):
                        return
            put(None)
        except BaseException as err:  # handed to the consumer, which re-raises it
            put(err)
        finally:
            # The pools have shut down, so no read or gather touches the buffers any more.
            self._idle_buffers = [[array, []] for array, _ in buffers]

    def _stream(
        self,
        reads,
        gathers,
        start: int,
        n_epochs: int | None,
        stop: threading.Event,
        buffers: list[list],
    ):
        """Yields a future per batch. Window buffers are recycled (three, unless a batch spans
        more windows: one being read, one being served, one whose last batches are still
        being gathered), because
        writing into fresh memory costs a page fault per 4 KiB. `buffers` holds
        [array, gather futures reading it, or None while in use]; it may start with idle ones."""
        B = self.batch_size
        md = self.md
        capacity = self._window_capacity()

        def take_buffer() -> list:
            while True:
                for entry in buffers:
                    if entry[1] is not None and all(f.done() for f in entry[1]):
                        entry[1] = None
                        return entry
                waiting = [f for e in buffers if e[1] is not None for f in e[1]]
                # A partial batch keeps every window it spans busy until it fills, so when
                # windows are smaller than a batch (an epoch's last window can be) none may
                # be on its way to free: then a fourth buffer is the only way on.
                if len(buffers) < 3 or not waiting:
                    shape = (capacity, md.n_tokens_per_img * md.d_vit)
                    entry = [np.empty(shape, md.np_dtype), None]
                    buffers.append(entry)
                    return entry
                concurrent.futures.wait(waiting, return_when=concurrent.futures.FIRST_COMPLETED)

        epoch, pos = divmod(start, self.n_tokens)
        carry: list[tuple[np.ndarray, np.ndarray]] = []  # a partial batch spanning windows
        carry_entries: list[tuple[list, list]] = []  # (buffer entry, its futures) it reads
        n_carry = 0
        plan = self._plan(epoch, pos, n_epochs)
        pending = None
        nxt = next(plan, None)
        if nxt is not None:
            entry = take_buffer()
            pending = (nxt, entry, self._read_window(reads, nxt[2], entry[0]))
        while pending is not None and not stop.is_set():
            (ep, wi, _, skip), entry, result = pending
            nxt = next(plan, None)
            pending = None
            if nxt is not None:
                # Start reading the next window before serving this one.
                nentry = take_buffer()
                pending = (nxt, nentry, self._read_window(reads, nxt[2], nentry[0]))
            buf, rows = result()
            perm = self._window_perm(ep, wi, rows.size)
            if perm is not None:
                rows = rows[perm]
            rows = rows[skip:]
            futures: list = []
            i = 0
            if n_carry:
                need = B - n_carry
                carry.append((buf, rows[:need]))
                i = min(need, rows.size)
                n_carry += i
                if n_carry == B:
                    f = gathers.submit(self._gather, carry)
                    futures.append(f)
                    for e, fs in carry_entries:
                        e[1] = [*fs, f]  # free once the carried batch is gathered too
                    yield f
                    carry, carry_entries, n_carry = [], [], 0
            while i + B <= rows.size:
                f = gathers.submit(self._gather, [(buf, rows[i : i + B])])
                futures.append(f)
                yield f
                i += B
            if i < rows.size:
                carry.append((buf, rows[i:]))
                n_carry += rows.size - i
            if n_carry and carry[-1][0] is buf:
                carry_entries.append((entry, futures))  # stays busy until the carry is served
            else:
                entry[1] = futures
        if n_carry and n_epochs is not None and not stop.is_set():
            yield gathers.submit(self._gather, carry)

    def _plan(self, epoch: int, pos: int, n_epochs: int | None):
        while n_epochs is None or epoch < n_epochs:
            wstart = 0
            for wi, chunk_ids in enumerate(self.windows(epoch)):
                n = int(self.chunk_tokens[chunk_ids].sum())
                if wstart + n > pos:
                    yield epoch, wi, chunk_ids, max(pos - wstart, 0)
                wstart += n
            epoch, pos = epoch + 1, 0

    def sample(self, n: int, seed: int = 0) -> Float[torch.Tensor, "n d_vit"]:
        """`n` tokens drawn uniformly (seeded) from the chosen images, for init and scale estimates."""
        rng = np.random.default_rng([seed, 0x5A4D])
        n = min(n, self.n_tokens)
        picks = np.sort(rng.choice(self.n_tokens, size=n, replace=False))
        # Token t of the epoch-ordered (unshuffled) stream: image imgs[t // n_tok], token t % n_tok.
        img = self.imgs[picks // self.n_tok]
        tok = picks % self.n_tok + self.tok_slice.start
        per = self.md.n_imgs_per_shard
        out = np.empty((n, self.md.d_vit), dtype=np.float32)
        shard_of = img // per
        for shard_i in np.unique(shard_of):
            m = shard_of == shard_i
            acts = self.shards.acts(int(shard_i))
            local = img[m] - shard_i * per
            vals = acts[local, self.layer_pos, tok[m]]
            if not all_finite(vals):
                j = int(np.flatnonzero(~np.isfinite(vals).all(axis=1))[0])
                check_finite(
                    self.shards,
                    int(shard_i),
                    local[j : j + 1],
                    vals[j : j + 1, None],
                    self.layer_pos,
                    int(tok[m][j]),
                )
            out[m] = vals
        return torch.from_numpy(out)

    def __len__(self) -> int:
        """Batches in one epoch (the last partial one included)."""
        return math.ceil(self.n_tokens / self.batch_size)


def _pread_into(fd: int, buf: memoryview, offset: int, path: os.PathLike) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise UserError(f"{path}: file ends at byte {offset + done}; the shard is truncated.")
        done += n
