"""`images:fairface`: the official FairFace layout.

```
ROOT/train/1.jpg ...   ROOT/fairface_label_train.csv   (file,age,gender,race,service_test)
ROOT/val/1.jpg ...     ROOT/fairface_label_val.csv
```
Images are recorded in the order of the label CSV; its `file` column (`val/1.jpg`) is the path.
`--images.split all` records train then val into one shard directory with a `split` label
column, which is what lets `saev probe` use FairFace's official val split as its held-out set.
"""

import csv
import dataclasses
import io
import pathlib
import typing

from saev.errors import UserError
from saev.images.common import ImageList, check_headers, check_root, read_csv_text

COLUMNS = ("file", "age", "gender", "race", "service_test")


@dataclasses.dataclass(frozen=True)
class FairFace:
    """FairFace (official layout: train/, val/ and fairface_label_{train,val}.csv); labels age, gender, race, service_test."""

    root: pathlib.Path
    """FairFace directory holding train/, val/ and the two label CSVs."""
    split: typing.Literal["train", "val", "all"] = "val"
    """Which split to record; 'all' records train then val, with a 'split' label column."""

    def load(self, *, strict: bool = False) -> ImageList:
        root = check_root(self.root)
        splits = ("train", "val") if self.split == "all" else (self.split,)
        present, skipped, names = [], [], []
        for split in splits:
            rows, bad, cols = _read_split(root, split, strict=strict)
            present += [{**row, "split": split} for row in rows]
            skipped += bad
            names += [c for c in cols if c not in names]
        if self.split == "all":
            names.append("split")
        paths, bad = check_headers(root, [r["file"].strip() for r in present], strict=strict)
        skipped += bad
        keep = set(paths)
        present = [r for r in present if r["file"].strip() in keep]
        labels = {n: [r.get(n) or "" for r in present] for n in names}
        data = {"kind": "fairface", "root": str(root), "split": self.split}
        return ImageList(root=root, paths=paths, labels=labels, data=data, skipped=skipped)


def _read_split(
    root: pathlib.Path, split: str, *, strict: bool
) -> tuple[list[dict[str, str]], list[tuple[str, str]], list[str]]:
    """Rows of one split's label CSV whose image exists, the skipped ones, and the label names."""
    csv_path = root / f"fairface_label_{split}.csv"
    if not csv_path.is_file():
        raise UserError(
            f"{csv_path}: missing; expected the official FairFace label file in --images.root."
        )
    reader = csv.DictReader(io.StringIO(read_csv_text(csv_path), newline=""))
    missing = [c for c in COLUMNS[:4] if c not in (reader.fieldnames or [])]
    if missing:
        raise UserError(f"{csv_path}: missing columns {missing}; expected {', '.join(COLUMNS)}.")
    rows = list(reader)
    names = [c for c in reader.fieldnames if c != "file"]
    present, skipped = [], []
    for row in rows:
        rel = row["file"].strip()
        if (root / rel).is_file():
            present.append(row)
        elif strict:
            raise UserError(f"{root / rel}: listed in {csv_path.name} but missing.")
        else:
            skipped.append((rel, f"listed in {csv_path.name} but missing"))
    if not present:
        raise UserError(
            f"{csv_path}: none of its {len(rows)} files exist under {root} "
            f"(e.g. {rows[0]['file'] if rows else '?'!r})."
        )
    return present, skipped, names
