"""Is the image dataset still the one a shard directory recorded?

A recording is its activations *and* the images they came from: row `i` of images.csv names
the image of activation `i`. So metadata.json keeps a fingerprint of the dataset (a hash of
each file's path and size, in index order, and one of the labels), and `files.tsv` the list
itself. A re-run whose dataset differs (a file renamed, replaced, added or removed, even with
the same count) is refused before anything in the directory is touched, naming how many
files differ and the first. Labels are fingerprinted apart from the files because they may
be re-attached on purpose (`--relabel`): the activations do not depend on them.

Directories recorded before saev kept fingerprints are checked against their images.csv
(paths and labels), and are otherwise left as they are.
"""

import csv
import dataclasses
import io
import pathlib

from saev.errors import UserError
from saev.helpers import atomic_write_text
from saev.images import ImageList
from saev.shards.metadata import Metadata
from saev.shards.writer import INDEX_FILE

FILES_FILE = "files.tsv"
"""`path<TAB>bytes` of every recorded image, in index order (header `path\tbytes`)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How to open a recording directory for `images`."""

    md: Metadata
    """The metadata to open the writer with (the recorded one where labels change)."""
    relabelled: Metadata | None = None
    """With --relabel and changed labels: the metadata to store once images.csv is rewritten."""


def check(root: pathlib.Path, md: Metadata, images: ImageList, *, relabel: bool) -> Plan:
    """Compare the dataset with what `root` recorded (nothing to compare in a new directory).

    Raises UserError when the files differ, or the labels differ without `relabel`. Any
    other difference in metadata is left to the writer, which refuses a foreign recording."""
    path = root / "metadata.json"
    if not path.is_file():
        return Plan(md)
    old = Metadata.load(path)
    if old.fingerprint is None:
        return _check_unfingerprinted(root, old, md, images, relabel=relabel)
    new = md.fingerprint or {}
    if old.fingerprint.get("files") != new.get("files"):
        raise UserError(_files_message(root, images))
    if old.fingerprint.get("labels") == new.get("labels"):
        return Plan(md)
    if not relabel:
        raise UserError(_labels_message(root, images))
    if _unlabelled(old) != _unlabelled(md):
        return Plan(md)  # recorded otherwise too: the writer names the difference
    return Plan(old, relabelled=md)


def _check_unfingerprinted(
    root: pathlib.Path, old: Metadata, md: Metadata, images: ImageList, *, relabel: bool
) -> Plan:
    """A directory recorded before saev kept fingerprints: compare with its images.csv."""
    md = dataclasses.replace(md, fingerprint=None)
    recorded = _read_index(root)
    if recorded is None:
        return Plan(md)
    paths, labels = recorded
    if paths != images.paths:
        raise UserError(_files_message(root, images))
    if labels == images.labels:
        return Plan(md)
    if not relabel:
        raise UserError(_labels_message(root, images))
    if _unlabelled(old) != _unlabelled(md):
        return Plan(md)
    return Plan(old, relabelled=md)


def _unlabelled(md: Metadata) -> dict:
    """metadata.json less what --relabel may change: the fingerprint and the label file's name."""
    dct = md.to_json()
    dct.pop("fingerprint", None)
    dct["data"] = {k: v for k, v in dct["data"].items() if k != "labels"}
    return dct


def write_file_list(root: pathlib.Path, images: ImageList) -> None:
    lines = [f"{p}\t{n}\n" for p, n in zip(images.paths, images.sizes, strict=True)]
    atomic_write_text(root / FILES_FILE, "path\tbytes\n" + "".join(lines))


# Reading what was recorded.


def _read_files(root: pathlib.Path) -> list[tuple[str, int | None]] | None:
    """(path, size) per recorded image from files.tsv, else (path, None) from images.csv."""
    path = root / FILES_FILE
    if path.is_file():
        rows = path.read_text(encoding="utf-8").splitlines()[1:]
        try:
            return [(p, int(n)) for p, n in (row.rsplit("\t", 1) for row in rows)]
        except ValueError:
            pass  # damaged: fall back to the index
    recorded = _read_index(root)
    return None if recorded is None else [(p, None) for p in recorded[0]]


def _read_index(root: pathlib.Path) -> tuple[list[str], dict[str, list[str]]] | None:
    """Paths and label columns of images.csv, or None when there is none (or it is damaged)."""
    path = root / INDEX_FILE
    if not path.is_file():
        return None
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))
    if not rows or rows[0][:2] != ["index", "path"]:
        return None
    header, rows = rows[0], rows[1:]
    cols = {name: [r[j] if j < len(r) else "" for r in rows] for j, name in enumerate(header)}
    return cols["path"], {name: cols[name] for name in header[2:]}


# Messages.


def _files_message(root: pathlib.Path, images: ImageList) -> str:
    head = f"--images.root {images.root} no longer holds the images recorded in {root}"
    tail = "restore them, or record into another --dump-to directory (nothing was changed)."
    recorded = _read_files(root)
    if recorded is None:
        return f"{head} (the dataset's fingerprint differs); {tail}"
    now = list(zip(images.paths, images.sizes, strict=True))
    rec_size = dict(recorded)
    now_size = dict(now)
    gone = [p for p, _ in recorded if p not in now_size]
    new = [p for p, _ in now if p not in rec_size]
    changed = [p for p, n in recorded if n is not None and p in now_size and now_size[p] != n]
    parts = []
    if gone:
        parts.append(f"{len(gone)} gone, first {gone[0]!r}")
    if new:
        parts.append(f"{len(new)} new, first {new[0]!r}")
    if changed:
        p = changed[0]
        parts.append(
            f"{len(changed)} changed size, first {p!r} ({rec_size[p]} bytes recorded, "
            f"{now_size[p]} now)"
        )
    n = len(gone) + len(new) + len(changed)
    if n:
        return f"{head}: {n} of {len(recorded)} files differ ({'; '.join(parts)}); {tail}"
    i = next((i for i, (a, b) in enumerate(zip(recorded, now, strict=False)) if a[0] != b[0]), None)
    if i is None:
        return f"{head} (the dataset's fingerprint differs); {tail}"
    return (
        f"{head}: the same files in another order (image {i}: {recorded[i][0]!r} recorded, "
        f"{now[i][0]!r} now); {tail}"
    )


def _labels_message(root: pathlib.Path, images: ImageList) -> str:
    source = images.data.get("labels") or f"the labels of --images.root {images.root}"
    index = root / INDEX_FILE
    tail = (
        "pass --relabel to re-attach the new labels (the activations are kept), or restore "
        "the old ones (nothing was changed)."
    )
    recorded = _read_index(root)
    if recorded is None:
        return f"{source}: the labels differ from those recorded in {root}; {tail}"
    paths, old = recorded
    if list(old) != list(images.labels):
        detail = f"columns {list(old)} recorded, {list(images.labels)} now"
    else:
        diff = [
            (i, name)
            for i in range(len(paths))
            for name in old
            if old[name][i] != images.labels[name][i]
        ]
        if not diff:
            return f"{source}: the labels differ from those fingerprinted in {root}; {tail}"
        n = len({i for i, _ in diff})
        i, name = diff[0]
        detail = (
            f"{n} images differ; first: {paths[i]!r} {name} {old[name][i]!r} recorded, "
            f"{images.labels[name][i]!r} now"
        )
    return f"{source}: the labels differ from {index} ({detail}); {tail}"
