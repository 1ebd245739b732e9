"""`images:hf`: the images of a Hugging Face `datasets` dataset, row by row.

`--images.name` is a dataset on the Hub (`ILSVRC/imagenet-1k`; read from the local cache when
offline, `HF_HUB_OFFLINE=1`) or a directory written by `Dataset.save_to_disk` /
`DatasetDict.save_to_disk`. Image `i` of the recording is row `i` of the split, always (an image
that fails to decode is recorded black and listed in skipped.txt, as for files), so the rows can
be reopened later by index (`saev visuals`). Every scalar column other than the image column
becomes a label; a `ClassLabel` column gives its class names.

`datasets` is an optional dependency (`pip install 'saev[hf]'`), imported only here.
"""

import dataclasses
import io
import logging
import os
import pathlib
import typing

import PIL.Image

from saev.errors import UserError
from saev.images.common import ImageList

logger = logging.getLogger("saev.images.hf")

SCALARS = ("bool", "int", "uint", "float", "string", "large_string")
"""Value dtypes (by prefix) whose columns become labels."""


@dataclasses.dataclass(frozen=True)
class HF:
    """A Hugging Face datasets dataset (Hub name, or a save_to_disk directory), one image per row; scalar columns become labels (needs `pip install 'saev[hf]'`)."""

    name: str
    """Dataset on the Hub (e.g. ILSVRC/imagenet-1k; offline it is read from the local cache), or a directory written by save_to_disk."""
    split: str = "train"
    """Split to record (a DatasetDict's key; a saved single Dataset must be of this split or have none)."""
    image_column: str = "image"
    """Column holding the images (a datasets.Image feature)."""

    def load(self, *, strict: bool = False) -> ImageList:
        ds, local = open_dataset(self.name, self.split)
        check_image_column(ds, self.image_column, self.name)
        reader = Reader(ds, self.image_column)
        prefix = self.split if self.split else "row"
        root = local if local is not None else cache_dir(ds)
        data = {
            "kind": "hf",
            "name": str(local) if local is not None else self.name,
            "split": self.split,
            "image_column": self.image_column,
            "root": None if local is None else str(local),
        }
        return ImageList(
            root=root,
            paths=[f"{prefix}/{i}" for i in range(len(ds))],
            labels=labels(ds, self.image_column),
            data=data,
            reader=reader,
        )


def import_datasets():
    """The `datasets` module, or a one-line UserError saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            "images:hf needs the Hugging Face `datasets` package: pip install 'saev[hf]'."
        ) from None
    return datasets


def open_dataset(name: str, split: str) -> tuple[typing.Any, pathlib.Path | None]:
    """(the split as a `datasets.Dataset`, the save_to_disk directory it came from or None)."""
    datasets = import_datasets()
    local = pathlib.Path(name).expanduser()
    if local.is_dir():
        local = local.resolve()
        try:
            ds = datasets.load_from_disk(str(local))
        except (FileNotFoundError, OSError, ValueError) as err:
            raise UserError(
                f"--images.name {local}: not a directory written by save_to_disk ({_line(err)})."
            ) from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(
                    f"--images.split {split!r}: {local} holds the splits {', '.join(ds)}."
                )
            ds = ds[split]
        elif ds.split is not None and str(ds.split) != split:
            raise UserError(
                f"--images.split {split!r}: {local} holds one dataset, of split {str(ds.split)!r}."
            )
        return _flat(ds), local
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many kinds (offline, missing, bad split)
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get(
            "HF_DATASETS_OFFLINE"
        ) in ("1", "true")
        hint = (
            "offline, only datasets in the local cache load: pass a save_to_disk directory instead"
            if offline
            else "check the name and split, or pass a directory written by save_to_disk"
        )
        raise UserError(
            f"--images.name {name!r} --images.split {split!r}: cannot load ({_line(err)}); {hint}."
        ) from None
    return _flat(ds), None


def check_image_column(ds, column: str, name: str) -> None:
    datasets = import_datasets()
    images = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    if column not in ds.features or column not in images:
        what = (
            f"is a {type(ds.features[column]).__name__} column"
            if column in ds.features
            else "is not a column"
        )
        raise UserError(
            f"--images.image-column {column!r} {what} of {name}; image columns: "
            f"{', '.join(images) or '(none)'}."
        )


def labels(ds, image_column: str) -> dict[str, list[str]]:
    """Every scalar column but the images, as strings ("" = missing); class names for ClassLabel."""
    datasets = import_datasets()
    out = {}
    for name, feature in ds.features.items():
        if name == image_column:
            continue
        values = ds.data.column(name).to_pylist()
        if isinstance(feature, datasets.ClassLabel):
            out[name] = [feature.int2str(v) if v is not None and v >= 0 else "" for v in values]
        elif isinstance(feature, datasets.Value) and feature.dtype.startswith(SCALARS):
            out[name] = ["" if v is None else str(v) for v in values]
    return out


def cache_dir(ds) -> pathlib.Path:
    files = [f["filename"] for f in ds.cache_files]
    return pathlib.Path(files[0]).parent if files else pathlib.Path(".")


class Reader:
    """Opens row `i`'s image (undecoded: its stored bytes, or the local file it points to).

    Picklable for DataLoader workers: the dataset pickles by reference to its memory-mapped
    files; the arrow column is looked up again in each process."""

    def __init__(self, ds, column: str):
        self.ds = ds
        self.column = column
        self._col = None

    def __getstate__(self) -> dict:
        return {"ds": self.ds, "column": self.column, "_col": None}

    def _values(self):
        if self._col is None:
            self._col = self.ds.data.column(self.column)
        return self._col

    def __call__(self, i: int) -> PIL.Image.Image:
        value = self._values()[i].as_py()
        if value is None:
            raise OSError(f"row {i} has no image")
        if value.get("bytes") is not None:
            return PIL.Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return PIL.Image.open(value["path"])
        raise OSError(f"row {i} has neither image bytes nor a path")

    def __len__(self) -> int:
        return len(self.ds)

    def sizes(self) -> list[int]:
        """Bytes of each stored image (the file's size for images stored as a path), from the
        arrow offsets, so no image is read."""
        import pyarrow.compute as pc

        out: list[int] = []
        for chunk in self._values().chunks:
            lengths = pc.binary_length(chunk.field("bytes")).to_pylist()
            paths = chunk.field("path").to_pylist()
            for n, path in zip(lengths, paths, strict=True):
                out.append(n if n is not None else _file_size(path))
        return out


def _file_size(path: str | None) -> int:
    try:
        return os.stat(path).st_size if path else 0
    except OSError:
        return 0


def _flat(ds):
    """`ds` without an indices mapping (after `select`/`shuffle`), so row i of its table is row i."""
    return ds.flatten_indices() if getattr(ds, "_indices", None) is not None else ds


def _line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
