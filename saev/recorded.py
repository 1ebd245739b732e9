"""The images behind a shard directory, for the commands that show or label them (visuals, probe).

A recording made by saev keeps its image index (images.csv: the path and labels of every
image) and a description of its dataset (metadata.json `data`): files under `data.root` (or
under `--images.root` when they moved), or the rows of a Hugging Face dataset (`images:hf`).

A saev 0.1 recording keeps neither index nor labels, only `repr()` of its dataset config, e.g.
`ImageFolderDataset(root='/data/imgs')`. Two of 0.1's datasets can be rebuilt exactly:

- `ImageFolderDataset`: 0.1 read it with torchvision's ImageFolder, so the order is that of
  `saev.images.imagenet.folder_order`, and the class folder is the `class` label. The folder
  must be passed (`--images.root`) and is checked against 0.1's own count of its files (0.1's
  `n_imgs` counted every file, so images past the ImageFolder samples are padding, with no
  image and no label).
- `ImagenetDataset(name=..., split=...)`: a Hugging Face dataset, read row by row as 0.1 did.
"""

import ast
import dataclasses
import logging
import os
import pathlib
import typing

import PIL.Image

from saev.errors import UserError
from saev.images import hf, imagenet
from saev.images.common import check_root
from saev.shards.metadata import LEGACY

logger = logging.getLogger("saev.recorded")


@dataclasses.dataclass
class Index:
    """An image index rebuilt in memory; the interface of `saev.shards.ImageIndex`."""

    file: pathlib.Path
    """What the index was rebuilt from (named in messages)."""
    path_list: list[str]
    label_cols: dict[str, list[str]]

    @property
    def columns(self) -> list[str]:
        return ["index", "path", *self.label_cols]

    @property
    def label_names(self) -> list[str]:
        return list(self.label_cols)

    def path(self, i: int) -> str:
        return self.path_list[i]

    def paths(self) -> list[str]:
        return list(self.path_list)

    def labels(self, name: str) -> list[str]:
        if name not in self.label_cols:
            raise UserError(
                f"{self.file}: no label column {name!r}; columns are {self.label_names}."
            )
        return list(self.label_cols[name])

    def __len__(self) -> int:
        return len(self.path_list)


@dataclasses.dataclass
class Recorded:
    """The index of a recording's images and a way to open image `i`."""

    index: typing.Any
    """`saev.shards.ImageIndex` (images.csv) or a rebuilt `Index`; None: no index at all."""
    where: str
    """Where the images are read from, for messages."""
    opener: typing.Callable[[int], PIL.Image.Image] | None = None

    def open(self, i: int) -> PIL.Image.Image | None:
        """Image `i`, or None when it has no path, is missing or cannot be read."""
        if self.opener is None or self.index is None or not self.index.path(i):
            return None
        try:
            img = self.opener(i)
            img.load()
            return img
        except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as err:
            logger.debug("image %d (%s): %s", i, self.index.path(i), err)
            return None


def recorded(shards, root: pathlib.Path | None, *, placeholders_ok: bool = False) -> Recorded:
    """The images of `shards` (a `saev.shards.Shards`), read from `root` when given.

    UserError when they cannot be found, naming what to pass. A saev 0.1 recording of a
    dataset whose order cannot be rebuilt gives an empty `Recorded` (no index, no images)
    with `placeholders_ok`, else a UserError."""
    md = shards.md
    if is_legacy(shards):
        return _legacy(shards, root, placeholders_ok=placeholders_ok)
    index = shards.images
    data = md.data if isinstance(md.data, dict) else {}
    if data.get("kind") == "hf":
        return _hf_rows(shards, index, data, root)
    return _files(shards, index, data, root)


def image_index(shards, root: pathlib.Path | None):
    """Only the index (paths and labels) of `shards`' images: images.csv, or for a saev 0.1
    recording the one rebuilt from `root` (UserError naming what to pass)."""
    if is_legacy(shards):
        return _legacy(shards, root, placeholders_ok=False).index
    return shards.images


def is_legacy(shards) -> bool:
    """A saev 0.1 recording, which keeps no image index."""
    return shards.md.protocol == LEGACY and not (shards.root / "images.csv").is_file()


def _files(shards, index, data: dict, root: pathlib.Path | None) -> Recorded:
    if root is None:
        recorded_root = data.get("root")
        if not recorded_root:
            raise UserError(
                f"{shards.root / 'metadata.json'} records no dataset root (data.root); "
                "pass --images.root."
            )
        root = pathlib.Path(recorded_root)
        if not root.is_dir():
            raise UserError(
                f"{root} (the dataset root recorded in {shards.root / 'metadata.json'}): no such "
                "directory; pass --images.root where the images are now."
            )
    elif not pathlib.Path(root).is_dir():
        raise UserError(f"--images.root {root}: no such directory.")
    root = pathlib.Path(root)
    return Recorded(index, str(root), lambda i: PIL.Image.open(root / index.path(i)))


def _hf_rows(shards, index, data: dict, root: pathlib.Path | None) -> Recorded:
    """A recording of `images:hf`: image i is row i of the split, reopened from --images.root
    (a save_to_disk directory), else from where it was recorded (directory or Hub cache)."""
    if root is not None and not pathlib.Path(root).is_dir():
        raise UserError(f"--images.root {root}: no such directory.")
    if root is None and data.get("root") and not pathlib.Path(data["root"]).is_dir():
        raise UserError(
            f"{data['root']} (the dataset recorded in {shards.root / 'metadata.json'}): no such "
            "directory; pass --images.root, the save_to_disk directory where it is now."
        )
    name = str(root) if root is not None else (data.get("root") or data.get("name"))
    ds, _ = hf.open_dataset(name, data.get("split", "train"))
    if len(ds) != shards.n_imgs:
        raise UserError(
            f"{name} split {data.get('split')!r} has {len(ds)} rows, but {shards.root} recorded "
            f"{shards.n_imgs} images from it; pass --images.root with the dataset it recorded."
        )
    return Recorded(index, f"{name} ({data.get('split')})", hf.Reader(ds, data["image_column"]))


# saev 0.1 recordings.


def parse_legacy_data(text: str) -> tuple[str, dict[str, typing.Any]]:
    """`ImageFolderDataset(root='/x')` -> ("ImageFolderDataset", {"root": "/x"}); ("", {}) for
    anything else. Parsed, never evaluated: only literal keyword values are read."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
            return node.func.id, {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except (SyntaxError, ValueError):
        pass
    return "", {}


def _legacy(shards, root: pathlib.Path | None, *, placeholders_ok: bool) -> Recorded:
    md = shards.md
    text = md.data.get("repr", "") if isinstance(md.data, dict) else str(md.data)
    kind, args = parse_legacy_data(text)
    if kind == "ImageFolderDataset":
        return _legacy_folder(shards, args.get("root"), root)
    if kind == "ImagenetDataset":
        return _legacy_hf(shards, args, root)
    msg = (
        f"{shards.root}: saev 0.1 shards of {text or 'an unrecorded dataset'}, whose image order "
        "saev cannot rebuild (it can for 0.1's ImageFolderDataset and ImagenetDataset)"
    )
    if not placeholders_ok:
        raise UserError(msg + "; re-record the images with `saev activations` for an image index.")
    logger.warning("%s; images are drawn as placeholders.", msg)
    return Recorded(None, "(no image index)")


def _legacy_folder(shards, recorded_root: str | None, root: pathlib.Path | None) -> Recorded:
    md = shards.md
    if root is None:
        raise UserError(
            f"{shards.root}: saev 0.1 shards keep no image index; pass --images.root "
            f"{recorded_root or 'DIR'} (the ImageFolderDataset root they were recorded from) to "
            "rebuild it in ImageFolder order, as saev 0.1 read it."
        )
    root = check_root(root)
    n_files = sum(len(files) for _, _, files in os.walk(root))
    if n_files != md.n_imgs:
        raise UserError(
            f"--images.root {root}: {n_files} files there, but the saev 0.1 recording in "
            f"{shards.root} counted {md.n_imgs} (its n_imgs) under {recorded_root}; the folder "
            "changed or is another one, so the image order cannot be rebuilt."
        )
    samples = imagenet.folder_order(root)
    pad = [""] * (md.n_imgs - len(samples))  # 0.1 counted non-image files as images too
    classes = [c for _, c in samples]
    labels = {"class": classes + pad}
    names_file = imagenet.find_class_names(root, None)
    if names_file is not None:
        labels["class_name"] = imagenet.class_name_labels(names_file, classes) + pad
    index = Index(shards.root / "metadata.json", [p for p, _ in samples] + pad, labels)
    return Recorded(index, str(root), lambda i: PIL.Image.open(root / index.path(i)))


def _legacy_hf(shards, args: dict, root: pathlib.Path | None) -> Recorded:
    name = str(root) if root is not None else args.get("name", "ILSVRC/imagenet-1k")
    split = args.get("split", "train")
    ds, _ = hf.open_dataset(name, split)
    if len(ds) != shards.n_imgs:
        raise UserError(
            f"{name} split {split!r} has {len(ds)} rows, but the saev 0.1 recording in "
            f"{shards.root} holds {shards.n_imgs} images; pass --images.root with the dataset "
            "it recorded (a save_to_disk directory)."
        )
    index = Index(
        shards.root / "metadata.json",
        [f"{split}/{i}" for i in range(len(ds))],
        hf.labels(ds, "image"),
    )
    hf.check_image_column(ds, "image", name)
    return Recorded(index, f"{name} ({split})", hf.Reader(ds, "image"))
