"""Write a shard directory: acts*.bin, shards.json, metadata.json and images.csv.

`ShardWriter` takes batches of activations in image order and streams them to disk from a
background thread, so the caller (the ViT loop) never waits on the disk unless the disk is
the bottleneck. Each shard is written to a hidden temp file, fsynced, renamed to
`actsNNNNNN.bin`, and only then marked complete in `shards.json` (itself written atomically
under a file lock, because several `--n-jobs` processes may share one directory). A killed
run therefore never leaves a shard that a later run trusts: re-opening the writer resumes at
the first incomplete shard of its range.

A writer holds an exclusive lock on its shard range for as long as it is open, so a second
run into the same shards stops at once with one line naming the first one's pid and host
(`--n-jobs` parts lock only their own ranges and run side by side). Files that fail to decode
during recording are noted per shard in `shards.json` when the shard completes, and
`skipped.txt` is rebuilt from those notes, so a killed and resumed run lists them all.
"""

import contextlib
import csv
import fcntl
import io
import json
import logging
import os
import pathlib
import queue
import re
import socket
import threading
import typing

import numpy as np
import torch

from saev.errors import UserError
from saev.helpers import atomic_write_json, atomic_write_text
from saev.shards.metadata import PROTOCOL, Metadata

logger = logging.getLogger("saev.shards.writer")

STATUS_FILE = "shards.json"
INDEX_FILE = "images.csv"
SKIPPED_FILE = "skipped.txt"
LOCK_FILE = ".shards.lock"
"""Held (flock) for a moment around every read-modify-write of shards.json or skipped.txt."""
WRITER_LOCK = re.compile(r"\.writer\.(\d+)-(\d+)\.lock")
"""`.writer.START-STOP.lock`: held (flock) by the writer of shards [START, STOP) while open."""

Skip = tuple[str, str]
"""(path, reason) of a file left out of a recording, as listed in skipped.txt."""


# shards.json


def _status_doc(md: Metadata, complete: list[bool], notes: list[list[Skip]]) -> dict:
    shards = []
    for i, done in enumerate(complete):
        entry = {"file": md.shard_file(i), "n_imgs": md.n_imgs_in(i), "complete": bool(done)}
        if done and notes[i]:
            entry["skipped"] = [list(note) for note in notes[i]]
        shards.append(entry)
    return {"protocol": PROTOCOL, "n_shards": md.n_shards, "shards": shards}


def _read_doc(root: pathlib.Path, md: Metadata) -> tuple[list[bool], list[list[Skip]]]:
    """Completion flag and skip notes per shard. A shard whose file is missing or the wrong
    size is never complete, whatever shards.json says, and has no notes."""
    complete = [False] * md.n_shards
    notes: list[list[Skip]] = [[] for _ in range(md.n_shards)]
    path = root / STATUS_FILE
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
            for i, entry in enumerate(doc["shards"][: md.n_shards]):
                complete[i] = bool(entry["complete"])
                notes[i] = [(str(p), str(why)) for p, why in entry.get("skipped", [])]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise UserError(
                f"{path}: unreadable shard status ({err!r}); expected shards.json."
            ) from err
    for i in range(md.n_shards):
        if complete[i]:
            f = root / md.shard_file(i)
            want = md.n_imgs_in(i) * md.bytes_per_img
            if not f.is_file() or f.stat().st_size != want:
                complete[i] = False
        if not complete[i]:
            notes[i] = []
    return complete, notes


def read_status(root: str | os.PathLike, md: Metadata) -> list[bool]:
    """Completion flag per shard. A shard whose file is missing or the wrong size is never
    complete, whatever shards.json says."""
    return _read_doc(pathlib.Path(root), md)[0]


def read_skipped(root: str | os.PathLike, md: Metadata) -> list[Skip]:
    """Files that failed to decode while the complete shards were recorded, in image order."""
    return [note for shard in _read_doc(pathlib.Path(root), md)[1] for note in shard]


@contextlib.contextmanager
def _locked(root: pathlib.Path):
    with open(root / LOCK_FILE, "a") as fd:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def _mark(
    root: pathlib.Path,
    md: Metadata,
    shard_i: int | None,
    notes: typing.Sequence[Skip] = (),
    before: typing.Sequence[Skip] | None = None,
) -> None:
    """Under the lock: re-read shards.json, set `shard_i` complete with its skip notes, write
    it back, and rebuild skipped.txt (`before`, then every complete shard's notes) unless
    `before` is None."""
    with _locked(root):
        complete, all_notes = _read_doc(root, md)
        if shard_i is not None:
            complete[shard_i] = True
            all_notes[shard_i] = list(notes)
        doc, path = _status_doc(md, complete, all_notes), root / STATUS_FILE
        if not path.is_file() or json.loads(path.read_text()) != doc:
            atomic_write_json(path, doc)
        if before is not None:
            _write_skip_log(root, [*before, *(n for shard in all_notes for n in shard)])


def _write_skip_log(root: pathlib.Path, skipped: list[Skip]) -> None:
    path = root / SKIPPED_FILE
    if not skipped:
        path.unlink(missing_ok=True)
        return
    text = "".join(f"{p}\t{why}\n" for p, why in skipped)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)


# The writer's lock on its shard range


def _claim(root: pathlib.Path, shards: range) -> tuple[int, pathlib.Path]:
    """Take the exclusive lock of shards [start, stop): an flock on `.writer.START-STOP.lock`,
    which holds the holder's pid and host. Refuse (UserError) while a live writer holds an
    overlapping range; a lock file left by a killed run is not held (the OS drops flocks
    with their process), so it is removed. Returns the open lock file and its path."""
    mine = root / f".writer.{shards.start:06d}-{shards.stop:06d}.lock"
    with _locked(root):
        for path in sorted(root.glob(".writer.*.lock")):
            m = WRITER_LOCK.fullmatch(path.name)
            if m is None or int(m[2]) <= shards.start or int(m[1]) >= shards.stop:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
                os.close(fd)
                raise UserError(
                    f"{root}: shards {int(m[1])}..{int(m[2]) - 1} are being written by another "
                    f"`saev activations` ({holder}); wait for it to end or stop it, then re-run."
                ) from None
            os.close(fd)  # a killed run's lock: nobody holds it
            path.unlink(missing_ok=True)
        fd = os.open(mine, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: overlapping locks were checked
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
    return fd, mine


def _release(root: pathlib.Path, fd: int, path: pathlib.Path) -> None:
    with _locked(root):
        path.unlink(missing_ok=True)
        os.close(fd)


# images.csv


def write_image_index(
    root: str | os.PathLike, rows: typing.Sequence[dict[str, typing.Any]]
) -> None:
    """Write images.csv: columns `index,path,<labels...>`, one row per image in shard order.

    `rows[i]` is a dict with a `path` (relative to the dataset root) and any labels; label
    columns are the union of the rows' keys in first-seen order; a missing label is "".
    """
    columns = ["index", "path"]
    for row in rows:
        if "path" not in row:
            raise ValueError(f"image row {row!r} has no 'path'.")
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    w.writeheader()
    for i, row in enumerate(rows):
        w.writerow({**row, "index": i})
    atomic_write_text(pathlib.Path(root) / INDEX_FILE, buf.getvalue())


# The writer

_DONE = object()


class ShardWriter:
    """Append activations `[b, n_layers, n_tokens, d_vit]` in image order; see module doc.

    ```
    with ShardWriter(root, md) as w:
        for acts, rows in batches:             # acts: np.ndarray or torch.Tensor
            w.write(acts, rows=rows)           # rows: [{"path": ..., "label": ...}, ...] or None
    ```
    `shards` restricts the writer to a range of shard indices (one `--n-jobs` part).
    After opening, `start_img` is the first image still to write (resume) and `stop_img` the
    end of the range; callers feed exactly the images `[start_img, stop_img)`.
    images.csv is written at close only when rows were given for all `md.n_imgs` images;
    otherwise call `write_image_index` yourself.
    `skipped` (files left out before recording) makes the writer keep skipped.txt: those,
    then the files `write(..., skipped=...)` reported for every complete shard.
    Opening takes the lock of the shard range (UserError while another writer holds any of
    it); closing or aborting releases it.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        md: Metadata,
        *,
        shards: range | None = None,
        skipped: typing.Sequence[Skip] | None = None,
        max_queue: int = 2,
    ):
        self.root = pathlib.Path(root)
        self.md = md
        self.root.mkdir(parents=True, exist_ok=True)
        check_or_write_metadata(self.root, md)
        self.shards = range(md.n_shards) if shards is None else shards
        if self.shards.step != 1 or self.shards.start < 0 or self.shards.stop > md.n_shards:
            raise ValueError(
                f"shards={self.shards} is not a contiguous range in [0, {md.n_shards})."
            )
        self._before = None if skipped is None else list(skipped)
        self._lock = _claim(self.root, self.shards) if self.shards else None
        try:
            _mark(self.root, md, None, before=self._before)  # create or repair shards.json
            complete = read_status(self.root, md)
        except BaseException:
            self._unlock()
            raise
        todo = [i for i in self.shards if not complete[i]]
        per = md.n_imgs_per_shard
        self.stop_img = min(self.shards.stop * per, md.n_imgs)
        # Sequential writing means everything after the first incomplete shard is redone.
        self.start_img = todo[0] * per if todo else self.stop_img
        self.cursor = self.start_img
        self._rows: list[dict] = []
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._drain, name="saev-shard-writer", daemon=True)
        self._thread.start()
        self._closed = False

    def _unlock(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            _release(self.root, *lock)

    @property
    def done(self) -> bool:
        """True when every shard of the range is already complete (nothing to write)."""
        return self.start_img >= self.stop_img

    def write(
        self,
        acts: np.ndarray | torch.Tensor,
        rows: typing.Sequence[dict] | None = None,
        skipped: typing.Sequence[tuple[int, str, str]] = (),
    ):
        """Queue `acts[b, n_layers, n_tokens, d_vit]` for the next `b` images.

        `skipped`: (image index, path, reason) of images of this batch that could not be
        used (e.g. failed to decode); they are noted with their shard when it completes."""
        self._raise_if_failed()
        if tuple(acts.shape[1:]) != self.md.img_shape:
            raise ValueError(
                f"acts shape {tuple(acts.shape)} does not match [b, *{list(self.md.img_shape)}]."
            )
        b = int(acts.shape[0])
        if self.cursor + b > self.stop_img:
            raise ValueError(
                f"writing {b} images at {self.cursor} passes the end of this writer's range "
                f"({self.stop_img})."
            )
        if rows is not None:
            if len(rows) != b:
                raise ValueError(f"got {len(rows)} rows for {b} images.")
            self._rows.extend(rows)
        if any(not self.cursor <= img < self.cursor + b for img, _, _ in skipped):
            raise ValueError(f"skipped images {skipped} are not in this batch.")
        per = self.md.n_imgs_per_shard
        i = 0
        while i < b:
            img = self.cursor + i
            shard_i, offset = divmod(img, per)
            n = min(b - i, self.md.n_imgs_in(shard_i) - offset)
            last = offset + n == self.md.n_imgs_in(shard_i)
            notes = [(p, why) for j, p, why in sorted(skipped) if img <= j < img + n]
            self._put((shard_i, offset, acts[i : i + n], last, notes))
            i += n
        self.cursor += b

    def close(self) -> None:
        """Wait for queued writes; write images.csv when rows for every image were given."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(_DONE)
            self._thread.join()
            self._raise_if_failed()
            if self._rows and len(self._rows) == self.md.n_imgs:
                write_image_index(self.root, self._rows)
        finally:
            self._unlock()

    def abort(self) -> None:
        """Stop after the batches already queued; the shard in progress stays incomplete (its
        temp file is never renamed into place), so a re-run redoes it. Used on errors/interrupts."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(_DONE)
            self._thread.join()
        finally:
            self._unlock()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # Background thread.

    def _put(self, item) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _raise_if_failed(self) -> None:
        if self._error is not None and not isinstance(self._error, _Aborted):
            err, self._error = self._error, _Aborted()
            raise err

    def _drain(self) -> None:
        fd = None
        tmp = None
        notes: list[Skip] = []  # skip notes of the shard being written
        while True:
            item = self._queue.get()
            if item is _DONE:
                break
            if self._error is not None:
                continue
            shard_i, offset, acts, last, item_notes = item
            try:
                arr = _to_numpy(acts, self.md.np_dtype)
                if offset == 0:
                    if fd is not None:
                        fd.close()
                    tmp = self.root / f".{self.md.shard_file(shard_i)}.tmp"
                    fd = open(tmp, "wb")  # noqa: SIM115 (spans many queue items)
                    notes = []
                fd.write(memoryview(arr).cast("B"))
                notes += item_notes
                if last:
                    fd.flush()
                    os.fsync(fd.fileno())
                    fd.close()
                    fd = None
                    os.replace(tmp, self.root / self.md.shard_file(shard_i))
                    _mark(self.root, self.md, shard_i, notes, self._before)
                    logger.info("Completed shard %d (%s).", shard_i, self.md.shard_file(shard_i))
            except BaseException as err:  # surfaced in the caller's thread
                self._error = err
        if fd is not None:
            fd.close()


class _Aborted(Exception):
    pass


def _to_numpy(acts: np.ndarray | torch.Tensor, dtype: np.dtype) -> np.ndarray:
    if isinstance(acts, torch.Tensor):
        tdtype = torch.float16 if dtype == np.float16 else torch.float32
        acts = acts.detach().to(device="cpu", dtype=tdtype).contiguous().numpy()
    return np.ascontiguousarray(acts, dtype=dtype)


def check_or_write_metadata(root: pathlib.Path, md: Metadata) -> None:
    """Write metadata.json, or refuse when the directory holds a different recording."""
    path = root / "metadata.json"
    if not path.exists():
        md.dump(path)
        return
    old = Metadata.load(path)
    if old == md:
        return
    a, b = old.to_json(), md.to_json()
    diff = [k for k in b if a.get(k) != b.get(k)]
    k = diff[0] if diff else "?"
    raise UserError(
        f"{root} already holds shards of a different recording ({k}: {a.get(k)!r} there, "
        f"{b.get(k)!r} now); use another --dump-to directory."
    )
