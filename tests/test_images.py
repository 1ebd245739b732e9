"""saev.images: demo generation, folder scanning and labels, FairFace layout."""

import collections
import shutil

import pytest

from saev.errors import UserError
from saev.images import Demo, FairFace, Folder


def test_demo_is_deterministic_balanced_and_cached(tmp_path):
    a = Demo(root=tmp_path / "a", n_imgs=30, size=32).load()
    b = Demo(root=tmp_path / "b", n_imgs=30, size=32).load()
    assert a.paths == b.paths and a.labels == b.labels
    for p in a.paths:
        assert (a.root / p).read_bytes() == (b.root / p).read_bytes()
    assert list(a.labels) == ["colour", "shape", "size", "noise"]
    assert collections.Counter(a.labels["colour"]) == {"red": 10, "green": 10, "blue": 10}
    assert collections.Counter(a.labels["size"]) == {"small": 15, "large": 15}
    assert a.data["kind"] == "demo" and a.data["root"] == str(a.root)
    mtime = (a.root / a.paths[0]).stat().st_mtime_ns
    Demo(root=tmp_path / "a", n_imgs=30, size=32).load()  # reused, not regenerated
    assert (a.root / a.paths[0]).stat().st_mtime_ns == mtime
    c = Demo(root=tmp_path / "a", n_imgs=12, size=32).load()  # different settings: regenerated
    assert len(c) == 12 and len(list((tmp_path / "a" / "images").iterdir())) == 12


def test_demo_colour_is_planted(tmp_path):
    import numpy as np
    from PIL import Image

    il = Demo(root=tmp_path, n_imgs=12, size=32).load()
    for path, colour in zip(il.paths, il.labels["colour"], strict=True):
        px = np.asarray(Image.open(il.root / path)).reshape(-1, 3).astype(int)
        channel = int(np.argmax(np.abs(px - px.mean(axis=1, keepdims=True)).max(axis=0)))
        assert ["red", "green", "blue"][channel] == colour


@pytest.fixture
def folder(tmp_path):
    src = Demo(root=tmp_path / "demo", n_imgs=6, size=32).load()
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for i, p in enumerate(src.paths):
        shutil.copy(src.root / p, root / ("sub" if i % 2 else "") / f"{i}.png")
    (root / "notes.txt").write_text("hello")
    (root / "broken.png").write_bytes(b"not a png")
    (root / ".hidden.png").write_bytes(b"ignored")
    return root


def test_folder_skips_and_counts_bad_files(folder):
    il = Folder(root=folder).load()
    assert il.paths == ["0.png", "2.png", "4.png", "sub/1.png", "sub/3.png", "sub/5.png"]
    assert sorted(p for p, _ in il.skipped) == ["broken.png", "notes.txt"]
    with pytest.raises(UserError, match="broken.png: unreadable image|notes.txt: not an image"):
        Folder(root=folder).load(strict=True)


def test_folder_labels(folder, tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("file,age,gender\n0.png,3-9,Male\nsub/5.png,20-29,Female\nzzz.png,1,x\n")
    il = Folder(root=folder, labels=csv).load()
    assert il.labels == {
        "age": ["3-9", "", "", "", "", "20-29"],
        "gender": ["Male", "", "", "", "", "Female"],
    }
    assert il.rows()[5] == {"path": "sub/5.png", "age": "20-29", "gender": "Female"}
    csv.write_text("file,age\nnope.png,1\n")
    with pytest.raises(UserError, match="none of its 1 'file' values match an image"):
        Folder(root=folder, labels=csv).load()
    csv.write_text("path,age\n0.png,1\n")
    with pytest.raises(UserError, match="expected a 'file' column"):
        Folder(root=folder, labels=csv).load()
    with pytest.raises(UserError, match="no such directory"):
        Folder(root=tmp_path / "missing").load()


def make_fairface(tmp_path, n=4):
    src = Demo(root=tmp_path / "demo", n_imgs=n, size=32).load()
    root = tmp_path / "fairface"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        lines = ["file,age,gender,race,service_test"]
        for i, p in enumerate(src.paths):
            shutil.copy(src.root / p, root / split / f"{i + 1}.jpg")
            lines.append(
                f"{split}/{i + 1}.jpg,{i}0-{i}9,{'Male' if i % 2 else 'Female'},White,True"
            )
        (root / f"fairface_label_{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def test_fairface_layout(tmp_path):
    root = make_fairface(tmp_path)
    (root / "val" / "3.jpg").unlink()
    il = FairFace(root=root, split="val").load()
    assert il.paths == ["val/1.jpg", "val/2.jpg", "val/4.jpg"]
    assert il.labels["gender"] == ["Female", "Male", "Male"]
    assert list(il.labels) == ["age", "gender", "race", "service_test"]
    assert il.skipped == [("val/3.jpg", "listed in fairface_label_val.csv but missing")]
    assert il.data == {"kind": "fairface", "root": str(root.resolve()), "split": "val"}
    (root / "fairface_label_train.csv").unlink()
    with pytest.raises(UserError, match="fairface_label_train.csv: missing"):
        FairFace(root=root, split="train").load()


def test_fairface_all_records_both_splits_with_a_split_column(tmp_path):
    root = make_fairface(tmp_path, n=3)
    il = FairFace(root=root, split="all").load()
    assert il.paths == [f"{s}/{i}.jpg" for s in ("train", "val") for i in (1, 2, 3)]
    assert il.labels["split"] == ["train"] * 3 + ["val"] * 3
    assert list(il.labels) == ["age", "gender", "race", "service_test", "split"]
    assert il.data["split"] == "all"
