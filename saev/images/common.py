"""What every image dataset turns into: an ordered list of files with labels.

An `ImageList` is fixed before any activation is recorded (shards are laid out by image
index), so files that are clearly not images are dropped here, up front, and reported in
`skipped`. A file that passes the header check but fails to decode later is handled by
`ImageDataset`: it reports the failure instead of raising inside a DataLoader worker.
"""

import concurrent.futures
import dataclasses
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


@dataclasses.dataclass
class ImageList:
    """Images in recording order: `paths[i]` is relative to `root`; `labels[name][i]` a string."""

    root: pathlib.Path
    paths: list[str]
    labels: dict[str, list[str]]
    data: dict[str, typing.Any]
    """JSON description stored in metadata.json `data` (kind, root, split, ...)."""
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    """(path, reason) of files left out before recording."""

    def __len__(self) -> int:
        return len(self.paths)

    def rows(self) -> list[dict[str, str]]:
        """One dict per image for images.csv: path, then every label."""
        return [
            {"path": p, **{name: col[i] for name, col in self.labels.items()}}
            for i, p in enumerate(self.paths)
        ]


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
        self.root = images.root
        self.paths = images.paths
        self.transform = transform
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        try:
            with PIL.Image.open(self.root / self.paths[i]) as img:
                x = self.transform(img.convert("RGB"))
            return x, i, True
        except (OSError, ValueError, SyntaxError) as err:
            logger.debug("failed to decode %s: %s", self.paths[i], err)
            return torch.zeros(3, *self.image_size), i, False


def relative_files(root: pathlib.Path) -> list[str]:
    """Every non-hidden regular file under `root`, relative, sorted (recording order)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = pathlib.Path(dirpath).relative_to(root)
        out += [(rel_dir / f).as_posix() for f in filenames if not f.startswith(".")]
    return sorted(out)
