"""`python -m saev activations` end to end on a tiny random timm ViT and generated images."""

import json
import pathlib

import numpy as np
import pytest
import torch

from saev.__main__ import run
from saev.images import Demo
from saev.shards import Shards
from saev.shards import record as rec_mod
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
    dump = tmp_path / "dump"
    folder = ["images:folder", "--images.root", str(imgs)]
    cases = [
        ([*BASE, "images:folder", "--images.root", str(tmp_path / "nope")], "no such directory"),
        ([*BASE, *folder, "--images.labels", str(labels)], "none of its 1 'file' values match"),
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
