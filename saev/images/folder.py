"""`images:folder`: every image under a directory, recursively, with optional CSV labels."""

import csv
import dataclasses
import io
import logging
import pathlib

from saev.errors import UserError
from saev.images.common import (
    IMAGE_EXTS,
    ImageList,
    check_headers,
    check_root,
    read_csv_text,
    relative_files,
)

logger = logging.getLogger("saev.images.folder")


@dataclasses.dataclass(frozen=True)
class Folder:
    """Every image file under a directory (recursively), in sorted path order."""

    root: pathlib.Path
    """Directory of images (searched recursively; hidden files and folders are ignored)."""
    labels: pathlib.Path | None = None
    """Optional CSV whose `file` column holds paths relative to --images.root; every other column becomes a label."""

    def load(self, *, strict: bool = False) -> ImageList:
        root = check_root(self.root)
        candidates = []
        files, skipped = relative_files(root)
        for rel in files:
            if pathlib.Path(rel).suffix.lower() in IMAGE_EXTS:
                candidates.append(rel)
            elif strict:
                raise UserError(
                    f"{root / rel}: not an image file (--strict stops on the first bad file)."
                )
            else:
                skipped.append((rel, "not an image file"))
        paths, bad = check_headers(root, candidates, strict=strict)
        skipped += bad
        if not paths:
            raise UserError(f"--images.root {root}: no readable images found.")
        labels = read_labels(self.labels, paths, root) if self.labels else {}
        data = {
            "kind": "folder",
            "root": str(root),
            "labels": str(pathlib.Path(self.labels).resolve()) if self.labels else None,
        }
        return ImageList(root=root, paths=paths, labels=labels, data=data, skipped=skipped)


def read_labels(
    csv_path: pathlib.Path, paths: list[str], root: pathlib.Path
) -> dict[str, list[str]]:
    """Label columns aligned with `paths`; images without a row get "" labels."""
    csv_path = pathlib.Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise UserError(f"--images.labels {csv_path}: no such file.")
    reader = csv.DictReader(io.StringIO(read_csv_text(csv_path), newline=""))
    if not reader.fieldnames or "file" not in reader.fieldnames:
        raise UserError(f"{csv_path}: expected a 'file' column; found columns {reader.fieldnames}.")
    names = [c for c in reader.fieldnames if c != "file"]
    by_file: dict[str, dict[str, str]] = {}
    for row in reader:
        key = pathlib.PurePosixPath(row["file"].strip()).as_posix()
        if key in by_file:
            raise UserError(f"{csv_path}: file {key!r} appears twice.")
        by_file[key] = row
    index = set(paths)
    matched = sum(key in index for key in by_file)
    if matched == 0:
        example = next(iter(by_file), "")
        raise UserError(
            f"{csv_path}: none of its {len(by_file)} 'file' values match an image under {root} "
            f"(e.g. {example!r}; expected paths relative to --images.root such as {paths[0]!r})."
        )
    if matched < len(by_file):
        logger.warning("%s: %d label rows match no image.", csv_path, len(by_file) - matched)
    if matched < len(paths):
        logger.warning("%s: %d images have no label row.", csv_path, len(paths) - matched)
    return {n: [(by_file.get(p) or {}).get(n) or "" for p in paths] for n in names}
