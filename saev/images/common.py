"""What every image dataset turns into: an ordered list of images with labels.

An `ImageList` is fixed before any activation is recorded (shards are laid out by image
index), so files that are clearly not images are dropped here, up front, and reported in
`skipped`. A file that passes the header check but fails to decode later is handled by
`ImageDataset`: it reports the failure instead of raising inside a DataLoader worker.

Most datasets are files under a root; a dataset whose images live elsewhere (rows of a
Hugging Face dataset, `images:hf`) gives its list a `Reader` that opens image `i` and knows
each image's size in bytes (what the dataset's fingerprint is made of).
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import typing

import PIL.Image
import torch

from saev.errors import UserError

logger = logging.getLogger("saev.images")

IMAGE_EXTS = frozenset(
    ext for ext, fmt in PIL.Image.registered_extensions().items() if fmt in PIL.Image.OPEN
)


class Reader(typing.Protocol):
    """Images that are not files under the list's root: opened by index."""

    def __call__(self, i: int) -> PIL.Image.Image:
        """Image `i` (may raise OSError/ValueError when it cannot be decoded)."""
        ...

    def sizes(self) -> list[int]:
        """Size in bytes of each image as stored, in recording order."""
        ...


@dataclasses.dataclass
class ImageList:
    """Images in recording order: `paths[i]` is relative to `root` (or, with a `reader`, an id
    shown to the user); `labels[name][i]` a string."""

    root: pathlib.Path
    paths: list[str]
    labels: dict[str, list[str]]
    data: dict[str, typing.Any]
    """JSON description stored in metadata.json `data` (kind, root, split, ...)."""
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    """(path, reason) of files left out before recording."""
    reader: Reader | None = None
    """Opens image i when the images are not files under `root`; None: the file root/paths[i]."""

    def __len__(self) -> int:
        return len(self.paths)

    def open(self, i: int) -> PIL.Image.Image:
        """Image `i`, not decoded yet (use as a context manager; OSError when unreadable)."""
        if self.reader is not None:
            return self.reader(i)
        return PIL.Image.open(self.root / self.paths[i])

    def rows(self) -> list[dict[str, str]]:
        """One dict per image for images.csv: path, then every label."""
        return [
            {"path": p, **{name: col[i] for name, col in self.labels.items()}}
            for i, p in enumerate(self.paths)
        ]

    @functools.cached_property
    def sizes(self) -> list[int]:
        """Size in bytes of each file, in recording order (one `stat` per file, threaded)."""
        if self.reader is not None:
            return self.reader.sizes()

        def size(rel: str) -> int:
            try:
                return (self.root / rel).stat().st_size
            except OSError as err:
                raise UserError(f"{self.root / rel}: cannot stat ({err.strerror}).") from None

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            return list(pool.map(size, self.paths))

    def fingerprint(self) -> dict[str, typing.Any]:
        """What a recording stores to recognise its dataset (metadata.json `fingerprint`):
        a sha256 of the files (path and size of each, in recording order) and one of the
        labels, kept apart because labels may be re-attached without re-recording."""
        files = "".join(f"{p}\t{n}\n" for p, n in zip(self.paths, self.sizes, strict=True))
        labels = json.dumps([[name, col] for name, col in self.labels.items()])
        return {
            "n_files": len(self.paths),
            "files": hashlib.sha256(files.encode()).hexdigest(),
            "labels": hashlib.sha256(labels.encode()).hexdigest(),
        }


def check_root(root: pathlib.Path, flag: str = "--images.root") -> pathlib.Path:
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"{flag} {root}: no such directory.")
    return root.resolve()


def check_headers(
    root: pathlib.Path, paths: list[str], *, strict: bool, n_threads: int = 16
) -> tuple[list[str], list[tuple[str, str]]]:
    """Keep the paths PIL can identify (header only, cheap); the rest are skipped or fatal."""

    def ok(rel: str) -> str | None:
        try:
            with PIL.Image.open(root / rel) as img:
                img.size  # noqa: B018 (forces the header to be parsed)
            return None
        except (OSError, ValueError, PIL.Image.DecompressionBombError) as err:
            return f"unreadable image ({type(err).__name__}: {str(err)[:120]})"

    with concurrent.futures.ThreadPoolExecutor(n_threads) as pool:
        reasons = list(pool.map(ok, paths))
    good, bad = [], []
    for rel, reason in zip(paths, reasons, strict=True):
        if reason is None:
            good.append(rel)
        elif strict:
            raise UserError(f"{root / rel}: {reason} (--strict stops on the first bad file).")
        else:
            bad.append((rel, reason))
    return good, bad


class ImageDataset(torch.utils.data.Dataset):
    """`(image tensor, index, ok)`; `ok` is False when the file failed to decode, in which
    case the image is all zeros and the caller decides (skip-and-log or stop with --strict)."""

    def __init__(self, images: ImageList, transform: typing.Callable, image_size: tuple[int, int]):
        self.images = images
        self.transform = transform
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        try:
            with self.images.open(i) as img:
                x = self.transform(img.convert("RGB"))
            return x, i, True
        except (OSError, ValueError, SyntaxError) as err:
            logger.debug("failed to decode %s: %s", self.images.paths[i], err)
            return torch.zeros(3, *self.image_size), i, False


def relative_files(root: pathlib.Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Every non-hidden file under `root` (resolved), relative, sorted (recording order), and
    the directories left out, as (path/, reason).

    Directory symlinks are followed, but every real directory is walked once: a link to a
    directory inside `root` is left to the walk of its real path, and a directory already
    walked (by device and inode: a loop such as `a/up -> ..`, or two links to one folder
    outside `root`) is skipped. Otherwise a loop records each image once per way in."""
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    seen = {_inode(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel_dir = pathlib.Path(dirpath).relative_to(root)
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            path, rel = os.path.join(dirpath, d), (rel_dir / d).as_posix() + "/"
            if os.path.islink(path) and _walked_in(root, pathlib.Path(os.path.realpath(path))):
                where = pathlib.Path(os.path.realpath(path)).relative_to(root).as_posix() + "/"
                skipped.append((rel, f"link to {where} inside the root, walked once there"))
                continue
            try:
                inode = _inode(path)
            except OSError as err:
                skipped.append((rel, f"unreadable directory ({err.strerror})"))
                continue
            if inode in seen:
                skipped.append((rel, "directory already walked by another path (a link loop?)"))
                continue
            seen.add(inode)
            keep.append(d)
        dirnames[:] = keep
        files += [(rel_dir / f).as_posix() for f in filenames if not f.startswith(".")]
    if skipped:
        logger.warning(
            "%s: %d directories walked once only (first: %s %s).", root, len(skipped), *skipped[0]
        )
    return sorted(files), skipped


def _walked_in(root: pathlib.Path, target: pathlib.Path) -> bool:
    """Whether the walk of `root` reaches `target` by its real path (not hidden)."""
    if target != root and root not in target.parents:
        return False
    return not any(part.startswith(".") for part in target.relative_to(root).parts)


def _inode(path: str | os.PathLike) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def read_csv_text(path: pathlib.Path) -> str:
    """The text of a label CSV, which must be UTF-8 (a byte-order mark is allowed).

    Anything else stops with one line naming the file, the first bad line and the
    encoding it most likely is, so the user can convert it (`iconv -f ENC -t UTF-8`)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror}).") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            enc, where = "UTF-16", "it starts with a UTF-16 byte-order mark"
        else:
            line = data.count(b"\n", 0, err.start) + 1
            enc = "CP1252" if _decodes(data, "cp1252") else "LATIN1"
            where = f"line {line} has byte 0x{data[err.start]:02x}, likely {enc}"
        raise UserError(
            f"{path}: not UTF-8 ({where}); convert it, e.g. "
            f"`iconv -f {enc} -t UTF-8 {path} > labels-utf8.csv`."
        ) from None


def _decodes(data: bytes, encoding: str) -> bool:
    try:
        data.decode(encoding)
        return True
    except UnicodeDecodeError:
        return False
