"""`images:imagenet`: the torchvision ImageFolder layout, one folder per class.

```
ROOT/n01440764/n01440764_10026.JPEG ...      (ImageNet train/ or val/ sorted into classes)
ROOT/n01443537/...
```
Images are in torchvision's `ImageFolder` order (class folders sorted by name, then each
folder's files as `sorted(os.walk(...))` lists them, image extensions only), which is the
order saev 0.1 recorded its `image-folder-dataset` in: `saev.recorded` uses
`folder_order` to rebuild the image index of such a 0.1 recording.

The class folder is the `class` label. Where a class-name file is found (`--images.class-names`,
or `LOC_synset_mapping.txt`, `synset_words.txt` or `words.txt` in the root or one of its two
parents: lines `n01440764 tench, Tinca tinca`), the human-readable name is the `class_name` label.
"""

import dataclasses
import logging
import os
import pathlib

import torchvision.datasets.folder

from saev.errors import UserError
from saev.images.common import ImageList, check_headers, check_root, read_csv_text

logger = logging.getLogger("saev.images.imagenet")

CLASS_NAME_FILES = ("LOC_synset_mapping.txt", "synset_words.txt", "words.txt")
"""Class-name files looked for in the root and its two parents, in this order."""


@dataclasses.dataclass(frozen=True)
class ImageNet:
    """One folder per class (torchvision ImageFolder, e.g. ImageNet's train/ or val/); labels class and, with a class-name file, class_name."""

    root: pathlib.Path
    """Directory holding one folder per class (ImageNet: the train/ or the sorted val/ folder)."""
    class_names: pathlib.Path | None = None
    """File of `FOLDER NAME` lines giving each class folder a human-readable name; default: LOC_synset_mapping.txt, synset_words.txt or words.txt in the root or one of its two parents, if any."""

    def load(self, *, strict: bool = False) -> ImageList:
        root = check_root(self.root)
        samples = folder_order(root)
        paths, skipped = check_headers(root, [p for p, _ in samples], strict=strict)
        classes = dict(samples)
        labels = {"class": [classes[p] for p in paths]}
        names_file = find_class_names(root, self.class_names)
        if names_file is not None:
            labels["class_name"] = class_name_labels(names_file, labels["class"])
        data = {
            "kind": "imagenet",
            "root": str(root),
            "class_names": None if names_file is None else str(names_file),
        }
        return ImageList(root=root, paths=paths, labels=labels, data=data, skipped=skipped)


def folder_order(root: pathlib.Path) -> list[tuple[str, str]]:
    """(path relative to `root`, class folder) of every image, in torchvision ImageFolder order."""
    try:
        _, class_to_idx = torchvision.datasets.folder.find_classes(root)
    except FileNotFoundError:
        raise UserError(
            f"--images.root {root}: no class folders; expected one folder of images per class "
            "(the torchvision ImageFolder layout)."
        ) from None
    samples = torchvision.datasets.folder.make_dataset(
        root,
        class_to_idx,
        extensions=torchvision.datasets.folder.IMG_EXTENSIONS,
        allow_empty=True,
    )
    if not samples:
        raise UserError(
            f"--images.root {root}: no images in its {len(class_to_idx)} class folders "
            f"(extensions {', '.join(torchvision.datasets.folder.IMG_EXTENSIONS)})."
        )
    classes = {i: name for name, i in class_to_idx.items()}
    return [(os.path.relpath(path, root), classes[i]) for path, i in samples]


def find_class_names(root: pathlib.Path, given: pathlib.Path | None) -> pathlib.Path | None:
    """The class-name file: `given` (which must exist), else the first of CLASS_NAME_FILES
    in `root` or its two parents."""
    if given is not None:
        given = pathlib.Path(given).expanduser()
        if not given.is_file():
            raise UserError(f"--images.class-names {given}: no such file.")
        return given.resolve()
    for folder in (root, root.parent, root.parent.parent):
        for name in CLASS_NAME_FILES:
            if (folder / name).is_file():
                return (folder / name).resolve()
    return None


def read_class_names(path: pathlib.Path) -> dict[str, str]:
    """`FOLDER NAME` per line (separated by the first run of spaces or a tab) -> {FOLDER: NAME}."""
    names = {}
    for n, line in enumerate(read_csv_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().split(None, 1)
        if len(parts) != 2:
            raise UserError(
                f"{path}: line {n} {line.strip()!r} has no name; expected `FOLDER NAME` per line "
                "(e.g. `n01440764 tench, Tinca tinca`)."
            )
        names[parts[0]] = parts[1].strip()
    return names


def class_name_labels(path: pathlib.Path, classes: list[str]) -> list[str]:
    """The human-readable name of each image's class ("" for classes the file does not name)."""
    names = read_class_names(path)
    missing = sorted(set(classes) - set(names))
    if len(missing) == len(set(classes)):
        raise UserError(
            f"{path}: names none of the class folders (e.g. {missing[0]!r}); pass the class-name "
            "file of this dataset with --images.class-names."
        )
    if missing:
        logger.warning(
            "%s: no name for %d class folders (first %r).", path, len(missing), missing[0]
        )
    return [names.get(c, "") for c in classes]
