"""saev 0.1's shard directories, `sae.pt` files and run directories through load, evaluate,
visuals and probe: the run's config is honoured, and the image order is rebuilt."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from saev01 import forward, make_world, write_shards
from test_images import hf_dataset

import saev.nn
from saev.__main__ import run
from saev.errors import UserError
from saev.nn.checkpoint import LEGACY_RAW, LEGACY_UNKNOWN, LegacySAE
from saev.recorded import image_index, parse_legacy_data, recorded
from saev.shards import Shards

N = 10  # images per class


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("saev01"), N)


def patch_tokens(world) -> torch.Tensor:
    """Every patch token of the recording in image order, the 0.1 padding row included."""
    return torch.from_numpy(world.acts[:, 0, 1:].reshape(-1, 16)).double()


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_a_01_run_directory_loads_with_its_config(world):
    """Before: `sae.safetensors: missing` for the directory, and a re-normalised SAE."""
    sae = saev.nn.load(world.raw)
    assert isinstance(sae, LegacySAE) and not sae.needs_calibration
    assert sae.cfg["input_normalisation"] == LEGACY_RAW
    assert (sae.layer, sae.tokens, sae.cfg["shard_root"]) == (-2, "patches", str(world.shards))
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(0))
    x_hat, f_x, loss = sae(x)
    want_hat, want_f, want_loss = forward(world.state, x, 4e-4)
    torch.testing.assert_close(x_hat, want_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.mse, want_loss[0], rtol=1e-4, atol=1e-6)
    # The same through sae.pt or the config.json beside it; the scaled run needs calibration.
    for path in (world.raw / "sae.pt", world.raw / "config.json"):
        torch.testing.assert_close(saev.nn.load(path).encode(x), f_x)
    scaled = saev.nn.load(world.scaled)
    assert scaled.needs_calibration and scaled.cfg["input_normalisation"] == LEGACY_UNKNOWN
    assert scaled.cfg["legacy_scaling"] == {"mean": True, "norm": True}


def test_calibration_follows_which_scaling_01_used(world, tmp_path):
    """scale_mean alone: x' = x - m; scale_norm alone: x' = x / c with c = mean ||x|| / sqrt(d)."""
    x = patch_tokens(world)
    for mean, norm in ((True, False), (False, True)):
        run_dir = tmp_path / f"m{mean}n{norm}"
        run_dir.mkdir()
        for name in ("sae.pt", "config.json"):
            (run_dir / name).write_bytes((world.scaled / name).read_bytes())
        cfg = json.loads((run_dir / "config.json").read_text())
        cfg["data"].update(scale_mean=mean, scale_norm=norm)
        (run_dir / "config.json").write_text(json.dumps(cfg))
        sae = saev.nn.calibrate_legacy(saev.nn.load(run_dir), x.float())
        m = x.mean(0) if mean else torch.zeros(16, dtype=torch.float64)
        c = (x - m).norm(dim=-1).mean() / 16**0.5 if norm else 1.0
        want, _, _ = forward({k: v.double() for k, v in world.state.items()}, (x - m) / c, 0.0)
        torch.testing.assert_close(sae(x.float())[0].double(), want * c + m, rtol=1e-4, atol=1e-4)


def evaluate_fvu(run_dir, out) -> float:
    assert run(["evaluate", "--ckpt", str(run_dir), "--data.n-tokens", "0", "--out", str(out)]) == 0
    (path,) = out.glob("*/evaluation.json")
    return json.loads(path.read_text())["fvu"]


def test_evaluate_honours_the_01_runs_scaling(world, tmp_path):
    """The 0.1 guide trained with scale_mean/scale_norm false: FVU must be 0.1's own forward on
    raw activations (before, saev re-normalised it anyway). With 0.1's default scaling, the
    mean and scale are re-estimated from the shards, as 0.1 did from its training sample."""
    x = patch_tokens(world)
    state = {k: v.double() for k, v in world.state.items()}
    raw_fvu = evaluate_fvu(world.raw, tmp_path / "raw")
    assert raw_fvu == pytest.approx(fvu(x, forward(state, x, 0.0)[0]), rel=1e-4)
    m = x.mean(0)
    c = (x - m).norm(dim=-1).mean() / 16**0.5
    want = forward(state, (x - m) / c, 0.0)[0] * c + m
    scaled_fvu = evaluate_fvu(world.scaled, tmp_path / "scaled")
    assert scaled_fvu == pytest.approx(fvu(x, want), rel=1e-4)
    assert abs(raw_fvu - scaled_fvu) > 0.1  # the two configs really differ here


def test_visuals_on_01_shards_rebuilds_the_image_folder_order(world, tmp_path, capsys):
    """The 0.1 guide's visuals command, with the folder it recorded: real images and the
    `class` label, not placeholders; without --images.root one line says what to pass."""
    guide = [
        "visuals",
        "--ckpt",
        str(world.raw / "sae.pt"),
        "--dump-to",
        str(tmp_path / "vis"),
        "--data.shard-root",
        str(world.shards),
        "--data.layer",
        "-2",
        "--data.patches",
        "patches",
    ]
    assert run([*guide, "images:imagenet-dataset"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and f"pass --images.root {world.imgs} " in err
    assert not (tmp_path / "vis").exists()

    more = ["images:image-folder-dataset", "--images.root", str(world.imgs)]
    more += ["--include-latents", "0", "1", "2", "3", "--n-latents", "0", "--top-n", "8"]
    assert run([*guide, *more]) == 0
    out = capsys.readouterr()
    assert "read as --out" in out.err and "read as --layer -2" in out.err
    rendered = sorted(int(p.stem) for p in (tmp_path / "vis" / "images").glob("*.jpg"))
    assert rendered and all(i < 2 * N + 1 for i in rendered)
    for i in rendered:
        if i == 2 * N:  # the README.txt row of 0.1's count holds no image: a placeholder
            continue
        r, _, b = (
            np.asarray(PIL.Image.open(tmp_path / "vis" / "images" / f"{i}.jpg"))
            .reshape(-1, 3)
            .mean(0)
        )
        assert (r > b) == (i < N), i  # cat/ images are red, dog/ ones blue: the right files
    html = "".join(p.read_text() for p in (tmp_path / "vis" / "latents").glob("*.html"))
    assert "cat" in html and "dog" in html


def test_probe_on_01_shards_with_the_class_folders_as_labels(world, tmp_path, capsys):
    argv = ["probe", "--data.shard-root", str(world.shards), "--out", str(tmp_path / "p")]
    argv += ["--attributes", "class", "--raw-token", "mean", "--split-by", "random"]
    argv += ["--test-frac", "0.5", "--lams", "0.1", "--max-iter", "50"]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"pass --images.root {world.imgs} " in err
    more = ["--images.root", str(world.imgs), "--ckpt", str(world.raw), "--pool", "max"]
    assert run([*argv, *more, "--top-k", "1"]) == 0
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["attributes"]["class"]["classes"] == ["cat", "dog"]
    assert report["attributes"]["class"]["n_missing"] == 1  # 0.1's padding row
    assert report["probes"]["raw-mean"]["class"]["accuracy"] == 1.0


def test_a_changed_folder_is_refused(world, tmp_path, capsys):
    extra = world.imgs.parent / "extra"
    extra.mkdir(exist_ok=True)
    argv = ["probe", "--data.shard-root", str(world.shards), "--out", str(tmp_path / "p")]
    argv += ["--attributes", "class", "--images.root", str(extra)]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert f"--images.root {extra}: 0 files there, but the saev 0.1 recording" in err
    assert f"counted {2 * N + 1} (its n_imgs)" in err


def test_01_dataset_reprs_are_parsed_not_evaluated():
    assert parse_legacy_data("ImageFolderDataset(root='/data/x')") == (
        "ImageFolderDataset",
        {"root": "/data/x"},
    )
    assert parse_legacy_data("ImagenetDataset(name='ILSVRC/imagenet-1k', split='val')")[1] == {
        "name": "ILSVRC/imagenet-1k",
        "split": "val",
    }
    assert parse_legacy_data("__import__('os').system('x')") == ("", {})
    assert parse_legacy_data("ImageFolderDataset(root=open('x'))") == ("", {})


def test_01_shards_of_an_hf_imagenet_read_its_rows(tmp_path, capsys):
    """0.1's `ImagenetDataset(name, split)` recorded the split row by row: the index and the
    images are the rows again (here from a save_to_disk copy passed as --images.root), the
    ClassLabel column gives the labels, and a dataset of another length is refused."""
    hf_root = hf_dataset(tmp_path / "hf", n=6)
    acts = np.random.default_rng(0).normal(size=(6, 1, 5, 16)).astype(np.float32)
    data = "ImagenetDataset(name='ILSVRC/imagenet-1k', split='train')"
    shards = Shards(write_shards(tmp_path / "shards", acts, data=data))
    with pytest.raises(UserError, match="ILSVRC/imagenet-1k"):  # offline, not in the cache
        recorded(shards, None)
    index = image_index(shards, hf_root)
    assert index.paths() == [f"train/{i}" for i in range(6)]
    assert index.labels("label") == ["cat", "dog"] * 3
    imgs = recorded(shards, hf_root)
    assert [imgs.open(i).convert("RGB").getpixel((0, 0)) for i in (0, 5)] == [
        (0, 7, 200),
        (200, 7, 200),
    ]
    short = Shards(write_shards(tmp_path / "short", acts[:4], data=data))
    with pytest.raises(UserError, match="has 6 rows, but the saev 0.1 recording"):
        image_index(short, hf_root)


def test_a_damaged_01_run_config_is_one_line(world, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "sae.pt").write_bytes((world.raw / "sae.pt").read_bytes())
    (run_dir / "config.json").write_text("{")
    with pytest.raises(UserError, match=r"config.json: not a readable JSON file \(Expecting") as e:
        saev.nn.load(run_dir)
    assert "saev 0.1's training config" in str(e.value) and "\n" not in str(e.value)
