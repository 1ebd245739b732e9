"""saev.images: demo generation, folder scanning and labels, FairFace, ImageNet and HF layouts."""

import collections
import pathlib
import shutil

import pytest
from factories import make_images

from saev.errors import UserError
from saev.images import HF, Demo, FairFace, Folder, ImageNet


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
    root = make_images(
        tmp_path / "imgs", [f"sub/{i}.png" if i % 2 else f"{i}.png" for i in range(6)]
    )
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
    root = tmp_path / "fairface"
    for split in ("train", "val"):
        make_images(root, [f"{split}/{i + 1}.jpg" for i in range(n)])
        lines = ["file,age,gender,race,service_test"]
        for i in range(n):
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


def test_folder_walks_each_real_directory_once(folder, tmp_path):
    want = ["0.png", "2.png", "4.png", "sub/1.png", "sub/3.png", "sub/5.png"]
    (folder / "sub" / "up").symlink_to("..")  # a loop: each image once, not once per lap
    il = Folder(root=folder).load()
    assert il.paths == want
    assert ("sub/up/", "link to ./ inside the root, walked once there") in il.skipped
    # A second name for a folder inside the root, and two links to one folder outside it.
    (folder / "alias").symlink_to("sub")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(folder / "0.png", outside / "x.png")
    (folder / "ext1").symlink_to(outside)
    (folder / "ext2").symlink_to(outside)
    il = Folder(root=folder).load()
    assert il.paths == sorted([*want, "ext1/x.png"])
    dirs = {p: why for p, why in il.skipped if p.endswith("/")}
    assert dirs == {
        "alias/": "link to sub/ inside the root, walked once there",
        "ext2/": "directory already walked by another path (a link loop?)",
        "sub/up/": "link to ./ inside the root, walked once there",
    }


@pytest.mark.parametrize("kind", ["folder", "fairface"])
def test_label_csv_that_is_not_utf8_is_one_line(folder, tmp_path, kind):
    if kind == "folder":
        csv = tmp_path / "labels.csv"
        csv.write_bytes("file,city\n0.png,Orl\xe9ans\nsub/1.png,Paris\n".encode("cp1252"))
        load = Folder(root=folder, labels=csv).load
    else:
        root = make_fairface(tmp_path, n=2)
        csv = root / "fairface_label_val.csv"
        csv.write_bytes(csv.read_bytes().replace(b"White", b"Caf\xe9", 1))
        load = FairFace(root=root, split="val").load
    with pytest.raises(UserError) as err:
        load()
    assert str(err.value) == (
        f"{csv}: not UTF-8 (line 2 has byte 0xe9, likely CP1252); convert it, e.g. "
        f"`iconv -f CP1252 -t UTF-8 {csv} > labels-utf8.csv`."
    )
    csv.write_bytes("file,city\n0.png,Paris\n".encode("utf-16"))
    with pytest.raises(UserError, match="not UTF-8 \\(it starts with a UTF-16 byte-order mark"):
        load()


def test_label_csv_with_a_byte_order_mark(folder, tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_bytes("file,city\n0.png,Orléans\n".encode("utf-8-sig"))  # as Excel saves it
    assert Folder(root=folder, labels=csv).load().labels["city"][0] == "Orléans"


def test_fingerprint_tracks_files_and_labels_apart(folder, tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("file,age\n0.png,1\n")
    base = Folder(root=folder, labels=csv).load()
    fp = base.fingerprint()
    assert fp["n_files"] == 6 and len(fp["files"]) == len(fp["labels"]) == 64
    assert base.sizes == [(folder / p).stat().st_size for p in base.paths]
    assert Folder(root=folder, labels=csv).load().fingerprint() == fp  # deterministic
    csv.write_text("file,age\n0.png,2\n")
    relabelled = Folder(root=folder, labels=csv).load().fingerprint()
    assert relabelled["files"] == fp["files"] and relabelled["labels"] != fp["labels"]
    (folder / "2.png").rename(folder / "2b.png")  # same count, another name
    renamed = Folder(root=folder, labels=csv).load().fingerprint()
    assert renamed["n_files"] == 6 and renamed["files"] != fp["files"]


# images:imagenet (torchvision ImageFolder layout) and images:hf (Hugging Face datasets).


@pytest.fixture
def image_folder(tmp_path):
    """Two class folders (one nested, odd extensions), a stray file and a broken image."""
    paths = [
        f"{('n02', 'n01')[i % 2]}/{'deep/' if i >= 4 else ''}img{i}.{'PNG' if i == 1 else 'png'}"
        for i in range(6)
    ]
    root = make_images(tmp_path / "train", [*paths, "loose.png"])  # loose.png: not in a class
    (root / "n01" / "notes.txt").write_text("not an image")
    return root


def test_imagenet_is_torchvision_imagefolder(image_folder, tmp_path):
    import torchvision

    il = ImageNet(root=image_folder).load()
    tv = torchvision.datasets.ImageFolder(image_folder)
    assert il.paths == [str(pathlib.Path(p).relative_to(image_folder)) for p, _ in tv.samples]
    assert il.labels == {"class": [tv.classes[c] for _, c in tv.samples]}
    assert il.paths[:2] == ["n01/img1.PNG", "n01/img3.png"] and il.labels["class"][-1] == "n02"
    assert il.data == {"kind": "imagenet", "root": str(image_folder), "class_names": None}
    (image_folder / "n01" / "img3.png").write_bytes(b"broken")
    il = ImageNet(root=image_folder).load()
    assert "n01/img3.png" not in il.paths and il.skipped[0][0] == "n01/img3.png"
    with pytest.raises(UserError, match="img3.png: unreadable image"):
        ImageNet(root=image_folder).load(strict=True)
    with pytest.raises(UserError, match="no class folders; expected one folder of images"):
        ImageNet(root=image_folder / "n01" / "deep").load()


def test_imagenet_class_names(image_folder, tmp_path):
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01 tench, Tinca tinca\nn02 goldfish\n")
    il = ImageNet(root=image_folder).load()  # found in the root's parent
    assert set(zip(il.labels["class"], il.labels["class_name"], strict=True)) == {
        ("n01", "tench, Tinca tinca"),
        ("n02", "goldfish"),
    }
    assert il.data["class_names"] == str(tmp_path / "LOC_synset_mapping.txt")
    mine = tmp_path / "mine.txt"
    mine.write_text("n02\tgold fish\n")  # one class unnamed: ""
    il = ImageNet(root=image_folder, class_names=mine).load()
    assert dict(zip(il.labels["class"], il.labels["class_name"], strict=True)) == {
        "n01": "",
        "n02": "gold fish",
    }
    mine.write_text("n07 x\n")
    with pytest.raises(UserError, match="names none of the class folders"):
        ImageNet(root=image_folder, class_names=mine).load()
    mine.write_text("n01\n")
    with pytest.raises(UserError, match="line 1 'n01' has no name"):
        ImageNet(root=image_folder, class_names=mine).load()


def hf_dataset(root, n=5):
    """A DatasetDict (train: n rows, validation: 2) saved with save_to_disk, as a user would."""
    import datasets
    from PIL import Image

    images = [Image.new("RGB", (16, 12), (40 * i, 7, 200)) for i in range(n)]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["cat", "dog"]),
            "caption": datasets.Value("string"),
            "score": datasets.Value("float32"),
            "boxes": datasets.Sequence(datasets.Value("int32")),
        }
    )
    rows = {
        "image": images,
        "label": [i % 2 for i in range(n)],
        "caption": [f"img {i}" for i in range(n)],
        "score": [0.5] * n,
        "boxes": [[1, 2]] * n,
    }
    ds = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": ds, "validation": ds.select([3, 1])}).save_to_disk(str(root))
    return root


def test_hf_rows_and_labels(tmp_path):
    import pickle

    root = hf_dataset(tmp_path / "hf")
    il = HF(name=str(root), split="validation").load()
    assert il.paths == ["validation/0", "validation/1"]
    assert il.labels == {
        "label": ["dog", "dog"],
        "caption": ["img 3", "img 1"],
        "score": ["0.5"] * 2,
    }
    assert il.data == {
        "kind": "hf",
        "name": str(root),
        "split": "validation",
        "image_column": "image",
        "root": str(root),
    }
    assert il.open(0).convert("RGB").getpixel((0, 0)) == (120, 7, 200)  # row 3 of train
    assert pickle.loads(pickle.dumps(il.reader))(1).size == (16, 12)  # for DataLoader workers
    assert len(il.sizes) == 2 and all(n > 50 for n in il.sizes)
    assert il.fingerprint() == HF(name=str(root), split="validation").load().fingerprint()


def test_hf_errors_are_one_line(tmp_path, monkeypatch):
    root = hf_dataset(tmp_path / "hf")
    with pytest.raises(
        UserError, match="--images.split 'test': .* holds the splits train, validation"
    ):
        HF(name=str(root), split="test").load()
    with pytest.raises(UserError, match="--images.image-column 'caption' is a Value column"):
        HF(name=str(root), image_column="caption").load()
    with pytest.raises(UserError, match="offline, only datasets in the local cache load"):
        HF(name="nobody/no-such-dataset").load()
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(
        UserError, match=r"needs the Hugging Face `datasets` package: pip install 'saev\[hf\]'"
    ):
        HF(name=str(root)).load()
