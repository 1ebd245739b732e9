"""`saev visuals` end to end on generated shards and images, and the explorer in Chromium.

The shards plant one known answer: image i has a single nonzero patch token, patch i % 4 of
layer 5, pointing along direction i % 6 with length 1 + i. With an SAE whose encoder is the
identity followed by ReLU, latent j fires exactly on images i = j (mod 6), on that one patch,
so its top images, statistics and heatmap regions are known by hand.
"""

import json
import pathlib
import re

import numpy as np
import pytest
import torch
from factories import make_images, write_shards
from PIL import Image

import saev.nn
import saev.visuals.main as visuals
from saev.__main__ import run

N_IMGS, D_VIT, GRID, LAYERS, SIZE = 12, 6, (2, 2), [3, 5], (32, 32)
N_PATCHES = GRID[0] * GRID[1]
MISSING = 5  # image 5's file is never written


def planted_acts() -> np.ndarray:
    acts = np.zeros((N_IMGS, len(LAYERS), 1 + N_PATCHES, D_VIT), dtype=np.float32)
    rng = np.random.default_rng(0)
    acts[:, 0] = rng.normal(size=acts[:, 0].shape)  # layer 3: noise the SAE must not read
    acts[:, 1, 0] = 50.0  # CLS token of layer 5: must not count as a patch
    for i in range(N_IMGS):
        acts[i, 1, 1 + i % N_PATCHES, i % D_VIT] = 1.0 + i
    return acts


def expected_top(latent: int, top_n: int) -> list[int]:
    imgs = [i for i in range(N_IMGS) if i % D_VIT == latent]
    return sorted(imgs, key=lambda i: -(1 + i))[:top_n]


def make_ckpt(path: pathlib.Path, *, d_vit: int = D_VIT, layer: int = 5, **extra) -> pathlib.Path:
    """A ReLU SAE whose encoder is the identity (scale 1, no biases): f = ReLU(x)."""
    stack = saev.nn.make_stack("relu", d_vit=d_vit, d_sae=d_vit, members=[{}])
    with torch.no_grad():
        stack.W_enc.copy_(torch.eye(d_vit)[None])
        stack.W_dec.copy_(torch.eye(d_vit)[None])
        stack.b_enc.zero_()
        stack.b_dec.zero_()
        stack.scale.fill_(1.0)
    return saev.nn.save(stack, 0, path, extra={"layer": layer, "tokens": "patches", **extra})


@pytest.fixture
def planted(tmp_path):
    """(shard_root, images_root, ckpt_dir) with the planted answer."""
    images = tmp_path / "imgs"
    images.mkdir()
    paths = [f"class{i % 2}/img{i}.png" for i in range(N_IMGS)]
    written = [i for i in range(N_IMGS) if i != MISSING]
    make_images(
        images,
        [paths[i] for i in written],
        colours=[(20 * i, 100, 255 - 20 * i) for i in written],
        size=(48, 40),
    )
    rows = [
        {"path": rel, "gender": "FM"[i % 2], "race": ["A", "B", "C"][i % 3]}
        for i, rel in enumerate(paths)
    ]
    shard_root = tmp_path / "shards"
    md = write_shards(
        shard_root,
        planted_acts(),
        rows=rows,
        vit_family="clip",
        vit_ckpt="test/random",
        layers=LAYERS,
        n_blocks=12,
        n_imgs_per_shard=5,
        image_size=SIZE,
        patch_grid=GRID,
        data={"kind": "folder", "root": str(images)},
        pretrained=False,
    )
    return shard_root, images, make_ckpt(tmp_path / "ckpt", shards=md.to_json())


def cli(shard_root, ckpt, out, *extra):
    return run(
        [
            "visuals",
            "--ckpt", str(ckpt),
            "--data.shard-root", str(shard_root),
            "--out", str(out),
            "--top-n", "3",
            "--log-freq-range", "-3", "0",
            "--log-value-range", "-1", "2",
            "--device", "cpu",
            "--batch-size", "4",
            *extra,
        ]
    )  # fmt: skip


def test_visuals_end_to_end(planted, tmp_path, capsys):
    shard_root, images, ckpt = planted
    out = tmp_path / "out"
    assert cli(shard_root, ckpt, out) == 0
    printed = capsys.readouterr().out
    assert "12 images, 48 patch tokens of layer 5" in printed
    assert "rendered 6 latents over 12 images (1 missing or unreadable" in printed

    # Cached pass results match the planted answer.
    res = visuals.load_cache(out, visuals.describe_cache(out)["key"], 3)
    for j in range(D_VIT):
        want = expected_top(j, 3)
        assert res.images[j].tolist() == want + [-1] * (3 - len(want))
        assert res.values[j, : len(want)].tolist() == [1.0 + i for i in want]
        assert res.count[j] == len(want)
        assert res.max[j] == 1.0 + want[0]
    assert res.n_tokens == N_IMGS * N_PATCHES

    # Pages, images and heatmaps exist for every latent.
    for j in range(D_VIT):
        page = (out / "latents" / f"{j}.html").read_text()
        for i in expected_top(j, 3):
            assert f'src="../heatmaps/{j}/{i}.jpg"' in page
            assert (out / "heatmaps" / str(j) / f"{i}.jpg").is_file()
            assert (out / "images" / f"{i}.jpg").is_file()
    # Latent 5's images are 11 and 5; 5 is missing and is flagged on its page.
    page5 = (out / "latents" / "5.html").read_text()
    assert page5.count("image file missing") == 1
    # Label distribution of the top images, beside the dataset's.
    page0 = (out / "latents" / "0.html").read_text()
    assert 'data-label="gender"' in page0 and 'data-label="race"' in page0
    assert re.search(r"<td>F</td><td[^>]*>.*?2 \(100%\)", page0)
    data = (out / "data.js").read_text()
    assert data.startswith("window.SAEV = ")
    doc = json.loads(data.removeprefix("window.SAEV = ").rstrip(";\n"))
    assert [lat["id"] for lat in doc["latents"]] == list(range(6))
    assert len(doc["all"]["freq"]) == D_VIT


def test_heatmap_lights_the_planted_patch(planted, tmp_path):
    shard_root, images, ckpt = planted
    out = tmp_path / "out"
    assert cli(shard_root, ckpt, out, "--include-latents", "2") == 0
    # Image 8 fires latent 2 on patch 8 % 4 = 0: the top-left 16x16 block.
    heat = np.asarray(Image.open(out / "heatmaps" / "2" / "8.jpg"), dtype=int)
    plain = np.asarray(Image.open(out / "images" / "8.jpg"), dtype=int)
    diff = np.abs(heat - plain).max(axis=2)
    assert diff[:14, :14].min() > 40  # lit (JPEG blurs the block edge, so stay 2 px inside)
    assert diff[18:, :].max() < 12 and diff[:, 18:].max() < 12  # the rest is unchanged


def test_rerun_reuses_the_cache(planted, tmp_path, capsys, monkeypatch):
    shard_root, images, ckpt = planted
    out = tmp_path / "out"
    assert cli(shard_root, ckpt, out) == 0
    key = visuals.describe_cache(out)["key"]
    capsys.readouterr()

    def no_pass(*args, **kwargs):
        raise AssertionError("the pass should come from the cache")

    monkeypatch.setattr(visuals, "topk_pass", no_pass)
    assert cli(shard_root, ckpt, out, "--include-latents", "1", "--n-latents", "0") == 0
    printed = capsys.readouterr().out
    assert "reused cached pass" in printed and "rendered 1 latents" in printed
    # A changed checkpoint runs the pass again.
    monkeypatch.undo()
    make_ckpt(ckpt, note="retrained")
    assert cli(shard_root, ckpt, out) == 0
    assert visuals.describe_cache(out)["key"] != key


def test_bad_input_messages(planted, tmp_path, capsys):
    shard_root, images, ckpt = planted
    out = tmp_path / "out"

    assert cli(shard_root, ckpt, out, "--log-freq-range", "-9", "-8") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no latent passes --log-freq-range -9 -8") and err.count("\n") == 1

    other_layer = make_ckpt(tmp_path / "layer7", layer=7)
    assert cli(shard_root, other_layer, out) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: checkpoint {other_layer} was trained on layer 7 but shards at {shard_root} "
        "hold layers [3, 5]; pass the shards it was trained on (or --layer).\n"
    )

    wide = make_ckpt(tmp_path / "wide", d_vit=8)
    assert cli(shard_root, wide, out) == 2
    assert f"error: checkpoint {wide} has d_vit=8 but shards at {shard_root} hold d_vit=6" in (
        capsys.readouterr().err
    )

    assert cli(shard_root, tmp_path / "nope", out) == 2
    assert "--ckpt" in capsys.readouterr().err

    assert cli(shard_root, ckpt, out, "--images.root", str(tmp_path / "nowhere")) == 2
    assert "--images.root" in capsys.readouterr().err

    assert cli(shard_root, ckpt, out, "--include-latents", "99") == 2
    assert "--include-latents 99 is out of range; the SAE has 6 latents" in capsys.readouterr().err


def test_all_images_missing_warns(planted, tmp_path, capsys):
    shard_root, images, ckpt = planted
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(shard_root, ckpt, tmp_path / "out", "--images.root", str(empty)) == 0
    out = capsys.readouterr().out
    assert "(12 missing or unreadable" in out and "warning: none of the 12 images" in out


@pytest.mark.browser
def test_explorer_in_chromium(planted, tmp_path, page):
    shard_root, images, ckpt = planted
    out = tmp_path / "out"
    assert cli(shard_root, ckpt, out) == 0

    page.goto((out / "index.html").as_uri())
    rows = page.locator("#latents tbody tr")
    assert rows.count() == 6
    # Default: most frequent first (ties by id).
    freq_of = {j: len(expected_top(j, 12)) for j in range(6)}

    def ids() -> list[int]:
        return [
            int(x)
            for x in page.eval_on_selector_all(
                "#latents tbody tr:not([hidden])", "els => els.map(e => e.dataset.id)"
            )
        ]

    assert [freq_of[i] for i in ids()] == sorted(freq_of.values(), reverse=True)
    page.click("th[data-key=max]")
    maxes = {j: 1 + expected_top(j, 1)[0] for j in range(6)}
    assert [maxes[i] for i in ids()] == sorted(maxes.values(), reverse=True)
    page.click("th[data-key=max]")  # again: ascending
    assert [maxes[i] for i in ids()] == sorted(maxes.values())
    page.click("th[data-key=id]")
    assert ids() == [0, 1, 2, 3, 4, 5]
    # Thumbnails load from disk.
    assert page.eval_on_selector_all(
        "#latents img", "els => els.every(e => e.complete && e.naturalWidth > 0)"
    )

    page.fill("#search", "3")
    assert ids() == [3]
    page.fill("#search", "17")
    assert ids() == [] and "no latent 17" in page.inner_text("#status")
    page.fill("#search", "")
    assert len(ids()) == 6
    page.screenshot(path=str(tmp_path / "index.png"), full_page=True)

    page.fill("#search", "4")
    page.press("#search", "Enter")
    page.wait_for_url(re.compile(r"latents/4\.html$"))
    figures = page.locator("figure")
    assert figures.count() == len(expected_top(4, 3))
    loaded = page.eval_on_selector_all(
        "figure img", "els => els.map(e => e.complete && e.naturalWidth)"
    )
    assert len(loaded) == 2 * figures.count() and all(w == SIZE[1] for w in loaded)
    assert "Latent 4" in page.inner_text("h1")
    page.screenshot(path=str(tmp_path / "latent4.png"), full_page=True)
    assert page.errors == []
    assert pathlib.Path(tmp_path / "latent4.png").stat().st_size > 0
