"""Write a shard directory: acts*.bin, shards.json, metadata.json and images.csv.

`ShardWriter` takes batches of activations in image order and streams them to disk from a
background thread, so the caller (the ViT loop) never waits on the disk unless the disk is
the bottleneck. Each shard is written to a hidden temp file, fsynced, renamed to
`actsNNNNNN.bin`, and only then marked complete in `shards.json` (itself written atomically
under a file lock, because several `--n-jobs` processes may share one directory). A killed
run therefore never leaves a shard that a later run trusts: re-opening the writer resumes at
the first incomplete shard of its range.
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
LOCK_FILE = ".shards.lock"


# shards.json


def _status_doc(md: Metadata, complete: list[bool]) -> dict[str, typing.Any]:
    return {
        "protocol": PROTOCOL,
        "n_shards": md.n_shards,
        "shards": [
            {"file": md.shard_file(i), "n_imgs": md.n_imgs_in(i), "complete": bool(done)}
            for i, done in enumerate(complete)
        ],
    }


def read_status(root: str | os.PathLike, md: Metadata) -> list[bool]:
    """Completion flag per shard. A shard whose file is missing or the wrong size is never
    complete, whatever shards.json says."""
    root = pathlib.Path(root)
    complete = [False] * md.n_shards
    path = root / STATUS_FILE
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
            for i, entry in enumerate(doc["shards"][: md.n_shards]):
                complete[i] = bool(entry["complete"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(
                f"{path}: unreadable shard status ({err!r}); expected shards.json."
            ) from err
    for i in range(md.n_shards):
        if complete[i]:
            f = root / md.shard_file(i)
            want = md.n_imgs_in(i) * md.bytes_per_img
            if not f.is_file() or f.stat().st_size != want:
                complete[i] = False
    return complete


@contextlib.contextmanager
def _locked(root: pathlib.Path):
    with open(root / LOCK_FILE, "a") as fd:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def _mark(root: pathlib.Path, md: Metadata, shard_i: int | None) -> None:
    """Re-read shards.json under the lock, set `shard_i` complete, and write it back."""
    with _locked(root):
        complete = read_status(root, md)
        if shard_i is not None:
            complete[shard_i] = True
        atomic_write_json(root / STATUS_FILE, _status_doc(md, complete))


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
    """

    def __init__(
        self,
        root: str | os.PathLike,
        md: Metadata,
        *,
        shards: range | None = None,
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
        _mark(self.root, md, None)  # create or repair shards.json
        complete = read_status(self.root, md)
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

    @property
    def done(self) -> bool:
        """True when every shard of the range is already complete (nothing to write)."""
        return self.start_img >= self.stop_img

    def write(self, acts: np.ndarray | torch.Tensor, rows: typing.Sequence[dict] | None = None):
        """Queue `acts[b, n_layers, n_tokens, d_vit]` for the next `b` images."""
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
        per = self.md.n_imgs_per_shard
        i = 0
        while i < b:
            img = self.cursor + i
            shard_i, offset = divmod(img, per)
            n = min(b - i, self.md.n_imgs_in(shard_i) - offset)
            last = offset + n == self.md.n_imgs_in(shard_i)
            self._put((shard_i, offset, acts[i : i + n], last))
            i += n
        self.cursor += b

    def close(self) -> None:
        """Wait for queued writes; write images.csv when rows for every image were given."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_DONE)
        self._thread.join()
        self._raise_if_failed()
        if self._rows and len(self._rows) == self.md.n_imgs:
            write_image_index(self.root, self._rows)

    def abort(self) -> None:
        """Stop after the batches already queued; the shard in progress stays incomplete (its
        temp file is never renamed into place), so a re-run redoes it. Used on errors/interrupts."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_DONE)
        self._thread.join()

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
        while True:
            item = self._queue.get()
            if item is _DONE:
                break
            if self._error is not None:
                continue
            shard_i, offset, acts, last = item
            try:
                arr = _to_numpy(acts, self.md.np_dtype)
                if offset == 0:
                    if fd is not None:
                        fd.close()
                    tmp = self.root / f".{self.md.shard_file(shard_i)}.tmp"
                    fd = open(tmp, "wb")  # noqa: SIM115 (spans many queue items)
                fd.write(memoryview(arr).cast("B"))
                if last:
                    fd.flush()
                    os.fsync(fd.fileno())
                    fd.close()
                    fd = None
                    os.replace(tmp, self.root / self.md.shard_file(shard_i))
                    _mark(self.root, self.md, shard_i)
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
