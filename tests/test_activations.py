"""`python -m saev activations` end to end on a tiny random timm ViT and generated images."""

import json
import pathlib

import numpy as np
import pytest
import torch

import saev.activations as rec_mod
from saev.__main__ import run
from saev.images import Demo
from saev.shards import Shards
from saev.vits import Recorder

# test_vit: 160 px, 10x10 patches, CLS, d=64, 6 blocks; 2000 // 101 = 19 images per shard.
BASE = [
    "--vit-family", "timm", "--vit-ckpt", "test_vit", "--random-weights",
    "--vit-layers", "-2", "0", "--n-patches-per-shard", "2000",
    "--batch-size", "8", "--n-workers", "0", "--device", "cpu",
]  # fmt: skip
N_IMGS = 45


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    Demo(root=root, n_imgs=N_IMGS, size=32).load()
    return root


def demo_args(root):
    return [
        "images:demo",
        "--images.root",
        str(root),
        "--images.n-imgs",
        str(N_IMGS),
        "--images.size",
        "32",
    ]


def only_dir(dump: pathlib.Path) -> pathlib.Path:
    (d,) = [p for p in dump.iterdir() if p.is_dir()]
    return d


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, demo_root):
    dump = tmp_path_factory.mktemp("dump")
    assert run(["activations", *BASE, "--dump-to", str(dump), *demo_args(demo_root)]) == 0
    return only_dir(dump)


def test_metadata_index_and_values(recorded, demo_root, capsys):
    md = json.loads((recorded / "metadata.json").read_text())
    assert md["layers"] == [4, 0] and md["n_blocks"] == 6
    assert (md["n_patches_per_img"], md["cls_token"], md["d_vit"]) == (100, True, 64)
    assert (md["n_imgs"], md["n_imgs_per_shard"], md["pretrained"]) == (N_IMGS, 19, False)
    assert md["patch_grid"] == [10, 10] and md["image_size"] == [160, 160]
    assert md["data"]["kind"] == "demo" and md["data"]["root"] == str(demo_root.resolve())
    shards = Shards(recorded)
    assert [shards.n_imgs_in(i) for i in range(3)] == [19, 19, 7]
    index = shards.images
    assert index.label_names == ["colour", "shape", "size", "noise"]
    assert index.path(3) == "images/00003.png"
    # Stored values equal a direct forward pass with hooks on the same images.
    from saev.images import ImageDataset

    images = Demo(root=demo_root, n_imgs=N_IMGS, size=32).load()
    vit = rec_mod_make_vit()
    ds = ImageDataset(images, vit.transform, vit.image_size)
    imgs = torch.stack([ds[i][0] for i in (0, 20, 44)])
    _, acts = Recorder(vit, [-2, 0])(imgs)
    for j, i in enumerate((0, 20, 44)):
        np.testing.assert_allclose(shards.img_acts(i), acts[j].numpy(), rtol=1e-5, atol=1e-5)


def rec_mod_make_vit():
    """The command's random model: it seeds torch with --seed (default 42) before building it."""
    from saev.vits import make_vit

    torch.manual_seed(42)
    return make_vit("timm", "test_vit", pretrained=False)


def test_resume_after_interrupt_is_byte_identical(tmp_path, demo_root, monkeypatch):
    args = ["activations", *BASE, "--dump-to", str(tmp_path / "a"), *demo_args(demo_root)]
    assert run(args) == 0
    ref = only_dir(tmp_path / "a")

    calls = {"n": 0}
    real = Recorder.record

    def flaky(self, imgs):
        calls["n"] += 1
        if calls["n"] == 4:  # shard 0 (3 batches: 8+8+3) done, then stop in shard 1
            raise KeyboardInterrupt
        return real(self, imgs)

    monkeypatch.setattr(Recorder, "record", flaky)
    args_b = ["activations", *BASE, "--dump-to", str(tmp_path / "b"), *demo_args(demo_root)]
    assert run(args_b) == 130
    out = only_dir(tmp_path / "b")
    assert out.name == ref.name  # same settings, same directory name
    status = json.loads((out / "shards.json").read_text())
    assert [s["complete"] for s in status["shards"]] == [True, False, False]
    monkeypatch.setattr(Recorder, "record", real)
    assert run(args_b) == 0
    for f in sorted(ref.glob("acts*.bin")) + [ref / "images.csv", ref / "metadata.json"]:
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_n_jobs_cover_every_image_once(tmp_path, demo_root, recorded, capsys):
    for i in range(2):
        args = ["activations", *BASE, "--n-jobs", "2", "--job-index", str(i)]
        assert run([*args, "--dump-to", str(tmp_path), *demo_args(demo_root)]) == 0
    out = only_dir(tmp_path)
    assert out.name == recorded.name  # the job split is not part of the hash
    shards = Shards(out)  # complete and all sizes right
    assert [s["n_imgs"] for s in json.loads((out / "shards.json").read_text())["shards"]] == [
        19,
        19,
        7,
    ]
    assert "shards 0..1 of 3" in capsys.readouterr().out
    assert shards.n_imgs == N_IMGS
    assert rec_mod.job_shards(3, 2, 1) == range(2, 3)
    ranges = [rec_mod.job_shards(10, 3, i) for i in range(3)]
    assert sorted(s for r in ranges for s in r) == list(range(10))


def test_float16_and_rerun_is_noop(tmp_path, demo_root, capsys):
    args = [
        "activations",
        *BASE,
        "--dtype",
        "float16",
        "--dump-to",
        str(tmp_path),
        *demo_args(demo_root),
    ]
    assert run(args) == 0
    out = only_dir(tmp_path)
    assert Shards(out).acts(0).dtype == np.float16
    assert "RANDOM WEIGHTS" in capsys.readouterr().out
    assert run(args) == 0
    assert "already complete" in capsys.readouterr().out


def test_bad_input_gives_one_line(tmp_path, demo_root, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for p in sorted((demo_root / "images").iterdir())[:3]:
        (imgs / p.name).write_bytes(p.read_bytes())
    (imgs / "bad.png").write_bytes(b"garbage")
    labels = tmp_path / "labels.csv"
    labels.write_text("file,age\nnothing.png,3\n")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("file,city\nbad.png,Orl\xe9ans\n".encode("latin-1"))
    dump = tmp_path / "dump"
    folder = ["images:folder", "--images.root", str(imgs)]
    cases = [
        ([*BASE, "images:folder", "--images.root", str(tmp_path / "nope")], "no such directory"),
        ([*BASE, *folder, "--images.labels", str(labels)], "none of its 1 'file' values match"),
        ([*BASE, *folder, "--images.labels", str(latin1)], "latin1.csv: not UTF-8 (line 2 has"),
        ([*BASE[:3], "vit_tinyy", *BASE[4:], *folder], "timm has no model 'vit_tinyy'"),
        ([*BASE[:6], "9", *BASE[8:], *folder], "--vit-layers 9 is out of range"),
        ([*BASE, "--strict", *folder], "bad.png: unreadable image"),
        ([*BASE, "--batch-size", "0", *folder], "--batch-size 0: expected a positive integer"),
        ([*BASE, "--job-index", "2", "--n-jobs", "2", *folder], "--job-index 2: expected 0..1"),
    ]
    for args, msg in cases:
        assert run(["activations", "--dump-to", str(dump), *args]) == 2, msg
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err
    # Non-strict: the bad file is skipped and listed.
    assert run(["activations", *BASE, "--dump-to", str(dump), *folder]) == 0
    out = only_dir(dump)
    assert "1 files skipped" in capsys.readouterr().out
    assert (out / "skipped.txt").read_text().startswith("bad.png\tunreadable image")
    assert Shards(out).n_imgs == 3
    # Dump dir that holds a different recording.
    assert run(["activations", *BASE, "--dtype", "float16", "--dump-to", str(out), *folder]) == 2
    err = capsys.readouterr().err
    assert "already holds shards of a different recording (dtype" in err


def test_slurm_submission_through_submitit(tmp_path, demo_root):
    import submitit

    cfg = rec_mod.Config(
        vit_family="timm",
        vit_ckpt="test_vit",
        random_weights=True,
        vit_layers=[-1],
        images=Demo(root=demo_root, n_imgs=N_IMGS, size=32),
        dump_to=tmp_path / "dump",
        n_patches_per_shard=2000,
        batch_size=16,
        n_workers=0,
        device="cpu",
        n_jobs=2,
        slurm=True,
    )
    executor = submitit.AutoExecutor(folder=tmp_path / "logs", cluster="debug")
    jobs = rec_mod.submit(cfg, executor=executor)
    for job in jobs:
        job.result()
    assert Shards(only_dir(tmp_path / "dump")).n_imgs == N_IMGS


def snapshot(root: pathlib.Path) -> dict:
    """Every file under `root` (hidden ones too) with its bytes and modification time."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# test_vit has 101 tokens per image: 202 patches per shard = 2 images per shard.
SMALL = [{"2000": "202"}.get(a, a) for a in BASE]


@pytest.fixture
def small_folder(tmp_path, demo_root):
    """Five demo images in a folder, and a label CSV for them."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, name in enumerate("abcde"):
        (imgs / f"{name}.png").write_bytes((demo_root / "images" / f"{i:05d}.png").read_bytes())
    labels = tmp_path / "labels.csv"
    labels.write_text("file,animal\n" + "".join(f"{n}.png,{n}at\n" for n in "abcde"))
    return imgs, labels


def test_changed_dataset_is_refused_and_nothing_changes(tmp_path, small_folder, capsys):
    imgs, labels = small_folder
    dump = tmp_path / "dump"
    args = ["activations", *SMALL, "--dump-to", str(dump), "images:folder"]
    args += ["--images.root", str(imgs), "--images.labels", str(labels)]
    assert run(args) == 0
    out = only_dir(dump)
    md = json.loads((out / "metadata.json").read_text())
    assert md["fingerprint"]["n_files"] == 5
    assert (out / "files.tsv").read_text().splitlines()[:2] == [
        "path\tbytes",
        f"a.png\t{(imgs / 'a.png').stat().st_size}",
    ]
    capsys.readouterr()
    before = snapshot(out)

    def refused(message: str) -> None:
        assert run(args) == 2
        err = capsys.readouterr().err
        assert err == f"error: {message}\n", err
        assert snapshot(out) == before

    tail = "restore them, or record into another --dump-to directory (nothing was changed)."
    head = f"--images.root {imgs} no longer holds the images recorded in {out}"
    (imgs / "b.png").rename(imgs / "z.png")  # same count, another name
    refused(f"{head}: 2 of 5 files differ (1 gone, first 'b.png'; 1 new, first 'z.png'); {tail}")
    (imgs / "z.png").rename(imgs / "b.png")
    c = (imgs / "c.png").read_bytes()
    (imgs / "c.png").write_bytes((imgs / "d.png").read_bytes())  # replaced by another image
    sizes = (len(c), (imgs / "d.png").stat().st_size)
    refused(
        f"{head}: 1 of 5 files differ (1 changed size, first 'c.png' ({sizes[0]} bytes "
        f"recorded, {sizes[1]} now)); {tail}"
    )
    (imgs / "c.png").write_bytes(c)

    labels.write_text(labels.read_text().replace("d.png,dat", "d.png,dog"))
    refused(
        f"{labels}: the labels differ from {out / 'images.csv'} (1 images differ; first: "
        "'d.png' animal 'dat' recorded, 'dog' now); pass --relabel to re-attach the new labels "
        "(the activations are kept), or restore the old ones (nothing was changed)."
    )
    # Re-attaching labels on purpose rewrites images.csv and the fingerprint, nothing else.
    assert run(["activations", "--relabel", *args[1:]]) == 0
    assert "re-attached the labels of 5 images" in capsys.readouterr().out
    after = snapshot(out)
    assert {k for k in before if before[k] != after.get(k)} == {"images.csv", "metadata.json"}
    assert Shards(out).images.labels("animal")[3] == "dog"
    new_md = json.loads((out / "metadata.json").read_text())
    assert new_md["fingerprint"]["files"] == md["fingerprint"]["files"]
    assert new_md["fingerprint"]["labels"] != md["fingerprint"]["labels"]
    assert run(args) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_directory_from_before_fingerprints_is_checked_by_its_index(tmp_path, small_folder, capsys):
    imgs, labels = small_folder
    dump = tmp_path / "dump"
    args = ["activations", *SMALL, "--dump-to", str(dump), "images:folder"]
    args += ["--images.root", str(imgs)]
    assert run(args) == 0
    out = only_dir(dump)
    # As an earlier saev wrote it: no fingerprint, no files.tsv.
    md = json.loads((out / "metadata.json").read_text())
    del md["fingerprint"]
    (out / "metadata.json").write_text(json.dumps(md))
    (out / "files.tsv").unlink()
    assert run(args) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert "fingerprint" not in json.loads((out / "metadata.json").read_text())
    before = snapshot(out)
    (imgs / "e.png").rename(imgs / "f.png")
    assert run(args) == 2
    err = capsys.readouterr().err
    assert "2 of 5 files differ (1 gone, first 'e.png'; 1 new, first 'f.png')" in err
    assert snapshot(out) == before


def test_second_run_into_the_same_shards_is_refused(tmp_path, small_folder, capsys):
    import os
    import socket

    from saev.shards import ShardWriter

    imgs, _ = small_folder
    (imgs / "up").symlink_to(".")  # a loop: walked once, and listed
    dump = tmp_path / "dump"
    args = ["activations", *SMALL, "--dump-to", str(dump), "images:folder"]
    args += ["--images.root", str(imgs)]
    assert run(args) == 0
    out = only_dir(dump)
    assert Shards(out).n_imgs == 5
    assert (
        out / "skipped.txt"
    ).read_text() == "up/\tlink to ./ inside the root, walked once there\n"
    capsys.readouterr()
    # Another run holds the lock of shards 0..1 (one --n-jobs part of two).
    holder = ShardWriter(out, Shards(out).md, shards=range(0, 2))
    before = snapshot(out)
    assert run(args) == 2
    assert capsys.readouterr().err == (
        f"error: {out}: shards 0..1 are being written by another `saev activations` (pid "
        f"{os.getpid()} on host {socket.gethostname()}); wait for it to end or stop it, then "
        "re-run.\n"
    )
    assert snapshot(out) == before
    # The other part's range is free.
    assert run([*args[:1], "--n-jobs", "2", "--job-index", "1", *args[1:]]) == 0
    assert "nothing to do: shards 2..2" in capsys.readouterr().out
    holder.close()
    assert run(args) == 0


KILLER = """
import os, sys, time
from saev.__main__ import run
from saev.shards import Metadata, read_status
from saev.vits import Recorder

real, calls = Recorder.record, [0]
def record(self, imgs):
    calls[0] += 1
    if calls[0] == 3:  # shards 0 and 1 are written; wait until they are marked, then die
        dump = sys.argv[sys.argv.index("--dump-to") + 1]
        (out,) = [os.path.join(dump, d) for d in os.listdir(dump)]
        md = Metadata.load(out)
        while not all(read_status(out, md)[:2]):
            time.sleep(0.01)
        os._exit(9)  # as kill -9: no finally, no atexit
    return real(self, imgs)
Recorder.record = record
run(sys.argv[1:])
"""


@pytest.mark.slow
def test_skip_log_survives_kill_9_and_resume(tmp_path, small_folder, capsys):
    import os
    import subprocess
    import sys

    imgs, _ = small_folder
    # a0.png passes the header check but fails to decode: recorded black, listed in skipped.txt.
    (imgs / "a0.png").write_bytes((imgs / "a.png").read_bytes()[:200])
    dump = tmp_path / "dump"
    args = ["activations", *SMALL, "--batch-size", "2", "--dump-to", str(dump), "images:folder"]
    args += ["--images.root", str(imgs)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()
    out = only_dir(dump)
    status = json.loads((out / "shards.json").read_text())["shards"]
    assert [s["complete"] for s in status] == [True, True, False]
    assert run(args) == 0
    assert "resuming at image 4 (shard 2)" in capsys.readouterr().out
    assert (out / "skipped.txt").read_text() == (
        "a0.png\tcould not decode; recorded as a black image\n"
    )


# images:imagenet and images:hf record like the others: resumable and byte-identical.


def imagenet_args(tmp_path, demo_root):
    """8 demo images as an ImageFolder (class folders by shape)."""
    import shutil

    root = tmp_path / "imagenet"
    images = Demo(root=demo_root, n_imgs=N_IMGS, size=32).load()
    for i, p in enumerate(images.paths[:8]):
        (root / images.labels["shape"][i]).mkdir(parents=True, exist_ok=True)
        shutil.copy(images.root / p, root / images.labels["shape"][i] / f"{i:02d}.png")
    return ["images:imagenet", "--images.root", str(root)]


def hf_args(tmp_path, demo_root):
    """8 demo images as a Hugging Face dataset saved to disk."""
    import datasets
    import PIL.Image

    images = Demo(root=demo_root, n_imgs=N_IMGS, size=32).load()
    rows = {
        "image": [PIL.Image.open(images.root / p) for p in images.paths[:8]],
        "shape": images.labels["shape"][:8],
    }
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "hf"))
    return ["images:hf", "--images.name", str(tmp_path / "hf"), "--images.split", "train"]


@pytest.mark.parametrize("source", [imagenet_args, hf_args])
def test_new_sources_resume_byte_identical(tmp_path, demo_root, monkeypatch, source):
    dataset = ["--n-patches-per-shard", "400", *source(tmp_path, demo_root)]  # 3 + 3 + 2 images
    args = ["activations", *BASE, "--dump-to", str(tmp_path / "a"), *dataset]
    assert run(args) == 0
    ref = only_dir(tmp_path / "a")
    index = (ref / "images.csv").read_text().splitlines()
    assert len(index) == 9 and index[0] in ("index,path,class", "index,path,shape")

    calls = {"n": 0}
    real = Recorder.record

    def flaky(self, imgs):
        calls["n"] += 1
        if calls["n"] == 2:  # shard 0 done, then stop in shard 1
            raise KeyboardInterrupt
        return real(self, imgs)

    monkeypatch.setattr(Recorder, "record", flaky)
    args_b = ["activations", *BASE, "--dump-to", str(tmp_path / "b"), *dataset]
    assert run(args_b) == 130
    out = only_dir(tmp_path / "b")
    status = json.loads((out / "shards.json").read_text())
    assert [s["complete"] for s in status["shards"]] == [True, False, False]
    monkeypatch.setattr(Recorder, "record", real)
    assert run(args_b) == 0
    assert out.name == ref.name
    for f in sorted(ref.glob("acts*.bin")) + [ref / "images.csv", ref / "metadata.json"]:
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_visuals_reopens_the_rows_of_an_hf_recording(tmp_path, demo_root, capsys):
    """images:hf images are rows, not files: visuals draws them from the dataset."""
    import PIL.Image

    import saev.nn

    dataset = hf_args(tmp_path, demo_root)
    assert run(["activations", *BASE, "--dump-to", str(tmp_path / "a"), *dataset]) == 0
    shards = only_dir(tmp_path / "a")
    stack = saev.nn.make_stack("relu", d_vit=64, d_sae=8, members=[{"seed": 0}])
    ckpt = saev.nn.save(stack, 0, tmp_path / "ckpt", {"layer": 4, "shard_root": str(shards)})
    argv = ["visuals", "--ckpt", str(ckpt), "--out", str(tmp_path / "vis"), "--device", "cpu"]
    assert run([*argv, "--include-latents", "0", "1", "--n-latents", "0", "--top-n", "4"]) == 0
    assert "missing" not in capsys.readouterr().out
    images = Demo(root=demo_root, n_imgs=N_IMGS, size=32).load()
    for jpg in (tmp_path / "vis" / "images").glob("*.jpg"):
        want = PIL.Image.open(images.root / images.paths[int(jpg.stem)]).convert("RGB")
        got = PIL.Image.open(jpg).convert("RGB").resize(want.size)
        diff = np.abs(np.asarray(got, dtype=float) - np.asarray(want, dtype=float)).mean()
        assert diff < 25, jpg.name  # the recorded row's picture (JPEG and resizing aside)
