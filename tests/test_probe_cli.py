"""`python -m saev probe` end to end on generated shards with planted labels."""

import json
import pathlib

import numpy as np
import pytest
import torch
from factories import write_shards

import saev.nn
from saev.__main__ import run
from saev.shards import Metadata, write_image_index

D_VIT, N_PATCHES, D_SAE = 16, 4, 24
COLOURS = ("red", "green", "blue")
SHAPES = ("circle", "square")


def make_shards(
    root: pathlib.Path,
    n: int = 300,
    seed: int = 0,
    labels: dict | None = None,
    cls_token: bool = True,
) -> Metadata:
    """Shards whose `colour` adds +4 along dim 0/1/2 and `shape` adds +-3 along dim 3 of
    every token; `noise` is drawn independently of the activations."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 3, size=n)
    shape = rng.integers(0, 2, size=n)
    noise = rng.integers(0, 2, size=n)
    acts = rng.normal(size=(n, 2, N_PATCHES + int(cls_token), D_VIT)).astype(np.float32)
    acts[np.arange(n), :, :, colour] += 4.0
    acts[:, :, :, 3] += np.where(shape == 1, 3.0, -3.0)[:, None, None]
    md = write_shards(
        root,
        acts,
        vit_family="clip",
        vit_ckpt="test/tiny",
        layers=[2, 5],
        n_blocks=6,
        cls_token=cls_token,
        n_imgs_per_shard=64,
        data={},
        pretrained=False,
    )
    rows = [
        {
            "path": f"img{i}.png",
            "colour": COLOURS[colour[i]],
            "shape": SHAPES[shape[i]],
            "noise": "ab"[noise[i]],
        }
        for i in range(n)
    ]
    if labels:
        for name, values in labels.items():
            for row, v in zip(rows, values, strict=True):
                row[name] = v
    write_image_index(root, rows)
    return md


def make_ckpt(
    path: pathlib.Path, md: Metadata, layer: int = 5, d_vit: int = D_VIT, tokens: str = "patches"
) -> pathlib.Path:
    """A ReLU SAE whose latent 0 reads dim 0 (red) and latent 1 reads dim 3 (shape); every
    other latent reads only the noise dims 4.."""
    stack = saev.nn.make_stack("relu", d_vit=d_vit, d_sae=D_SAE, members=[{}])
    g = torch.Generator().manual_seed(0)
    w = torch.zeros(d_vit, D_SAE)
    w[4:, 2:] = torch.randn(d_vit - 4, D_SAE - 2, generator=g) / 3
    w[0, 0] = 1.0
    w[3, 1] = 1.0
    with torch.no_grad():
        stack.W_enc[0] = w
        stack.b_enc[0] = 0.0
        stack.b_enc[0, 0] = -1.0
        stack.b_dec.zero_()
    extra = {"layer": layer, "tokens": tokens, "shards": md.to_json()}
    return saev.nn.save(stack, 0, path, extra)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    md = make_shards(root)
    return root, md


FAST = ["--lams", "0.1", "0.01", "0.001", "--max-iter", "100"]


def test_raw_probe_is_near_perfect_on_planted_labels_and_chance_on_noise(shards, tmp_path, capsys):
    root, _ = shards
    out = tmp_path / "out"
    argv = ["probe", "--data.shard-root", str(root), "--attributes", "colour", "shape", "noise"]
    argv += ["--out", str(out), "--min-cell-images", "5", "--crosses", "colour,shape", *FAST]
    assert run(argv) == 0
    doc = json.loads((out / "report.json").read_text())
    assert set(doc["probes"]) == {"raw-cls", "raw-mean"}
    for rep in ("raw-cls", "raw-mean"):
        assert doc["probes"][rep]["colour"]["accuracy"] >= 0.95
        assert doc["probes"][rep]["shape"]["accuracy"] >= 0.95
        assert abs(doc["probes"][rep]["noise"]["accuracy"] - 0.5) <= 0.15
    assert doc["layer"] == 5  # the last recorded layer by default
    assert doc["split"]["how"].startswith("random split")
    assert doc["split"]["n_train"] + doc["split"]["n_test"] == 300
    assert doc["attributes"]["colour"]["classes"] == ["blue", "green", "red"]
    assert [i["cross"] for i in doc["intersections"]] == [["colour", "shape"]]
    assert doc["alignment"] == {} and doc["ablations"] == {}
    for name in ("report.html", "accuracy.png"):
        assert (out / name).stat().st_size > 0
    assert {r["cache"] for r in doc["representations"].values()} == {"built"}
    # The representations are cached and reused.
    mean = np.load(out / "reps" / "raw-mean.npy")
    acts = np.fromfile(root / "acts000000.bin", dtype=np.float32).reshape(64, 2, 5, D_VIT)
    np.testing.assert_allclose(mean[:64], acts[:, 1, 1:].mean(1), rtol=1e-6)
    argv = ["probe", "--data.shard-root", str(root), "--attributes", "shape", "--out", str(out)]
    assert run([*argv, *FAST]) == 0
    doc = json.loads((out / "report.json").read_text())
    assert {r["cache"] for r in doc["representations"].values()} == {"cached"}
    assert "accuracy" in capsys.readouterr().out


def test_sae_probe_finds_the_planted_latent(shards, tmp_path):
    root, md = shards
    ckpt = make_ckpt(tmp_path / "ckpt", md)
    out, vis = tmp_path / "out", tmp_path / "visuals"
    (vis / "latents").mkdir(parents=True)
    argv = ["probe", "--data.shard-root", str(root), "--ckpt", str(ckpt)]
    argv += ["--attributes", "colour", "shape", "--out", str(out), "--raw-token", "cls"]
    argv += [
        "--pool",
        "max",
        "--top-k",
        "1",
        "100",
        "--min-cell-images",
        "5",
        "--visuals",
        str(vis),
        *FAST,
    ]
    assert run(argv) == 0
    doc = json.loads((out / "report.json").read_text())
    assert set(doc["probes"]) == {"raw-cls", "sae-max"}
    for pool in ("sae-max",):
        al = doc["alignment"][pool]
        assert al["colour"]["top"]["red"][0]["latent"] == 0
        assert al["colour"]["top"]["red"][0]["auroc"] > 0.95
        assert al["shape"]["top"]["square"][0]["latent"] == 1
        assert al["shape"]["ranking"][0]["latent"] == 1
        npz = np.load(out / al["colour"]["file"])
        assert npz["auroc"].shape == (D_SAE, 3)
        rows = doc["ablations"][pool]["shape"]
        assert [r["k"] for r in rows] == [1, D_SAE]
        # Latent 1 carries all of shape: alone it suffices; without it the probe is at chance.
        assert rows[0]["latents"] == [1]
        assert rows[0]["sufficiency_accuracy"] >= 0.9
        assert rows[0]["refit_accuracy"] <= 0.7
        assert rows[0]["mean_ablation_drop"] >= 0.2 and rows[0]["zero_ablation_drop"] >= 0.2
        assert doc["probes"][pool]["shape"]["accuracy"] >= 0.9
        # Targeted ablation: shape's latent matters to the shape probe, not to colour's.
        tpp = doc["tpp"][pool]
        assert tpp["attributes"] == ["colour", "shape"]
        k1 = tpp["rows"][0]
        assert k1["k"] == 1 and [r["k"] for r in tpp["rows"]] == [1, D_SAE]
        for kind in ("zero", "mean"):
            drop = np.array(k1[kind]["drop"])
            assert drop[1, 1] >= 0.2 and abs(drop[1, 0]) <= 0.05 and abs(drop[0, 1]) <= 0.05
            assert k1[kind]["tpp"] >= 0.1
    assert doc["visuals"] == "../visuals"
    page = (out / "report.html").read_text()
    assert 'href="../visuals/latents/1.html"' in page
    assert "mean-ablation" in page and "zero-ablation" in page and "TPP" in page
    assert (out / "ablation_shape.png").is_file() and (out / "tpp_sae-max.png").is_file()
    assert doc["sae"]["pooled_over"] == "patches"
    inter = doc["intersections"][0]
    assert inter["cross"] == ["colour", "shape"]
    assert set(inter["accuracy"]["colour"]) == {"raw-cls", "sae-max"}
    assert len(inter["departures"]) == 6
    assert inter["departure_fit"]["model"] == "fires ~ colour + shape"
    cells = inter["accuracy"]["shape"]["sae-max"]
    assert sum(c["n"] for c in cells["cells"]) == doc["split"]["n_test"]


def test_all_token_sae_codes_are_pooled_over_the_patches(shards, tmp_path):
    root, md = shards
    ckpt = make_ckpt(tmp_path / "ckpt", md, tokens="all")
    out = tmp_path / "out"
    argv = ["probe", "--data.shard-root", str(root), "--ckpt", str(ckpt), "--top-k", "1"]
    argv += ["--attributes", "shape", "--out", str(out), "--raw-token", "mean"]
    argv += ["--lams", "0.01", "--max-iter", "30"]
    assert run(argv) == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["sae"] == {"d_sae": D_SAE, "tokens": "all", "pooled_over": "patches"}
    assert (
        "trained on all tokens; codes pooled over the patch tokens"
        in (out / "report.html").read_text()
    )
    acts = np.fromfile(root / "acts000000.bin", dtype=np.float32).reshape(64, 2, 5, D_VIT)
    with torch.no_grad():
        codes = saev.nn.load(ckpt).encode(torch.from_numpy(acts[:, 1].reshape(-1, D_VIT)))
    codes = codes.reshape(64, 5, D_SAE).numpy()
    mean, peak = np.load(out / "reps" / "sae-mean.npy"), np.load(out / "reps" / "sae-max.npy")
    np.testing.assert_allclose(mean[:64], codes[:, 1:].mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(peak[:64], codes[:, 1:].max(1), rtol=1e-5, atol=1e-6)


def test_official_split_from_train_and_val_paths(tmp_path):
    n = 120
    paths = [f"train/{i}.jpg" if i % 4 else f"val/{i}.jpg" for i in range(n)]
    root = tmp_path / "shards"
    make_shards(root, n=n, labels={"path": paths})
    out = tmp_path / "out"
    argv = ["probe", "--data.shard-root", str(root), "--attributes", "colour", "--out", str(out)]
    assert run([*argv, "--split-by", "official", "--raw-token", "mean", *FAST]) == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["split"]["n_test"] == 30 and doc["split"]["how"].startswith("official")


def error_of(argv, capsys) -> str:
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_missing_attribute_lists_the_available_ones(shards, tmp_path, capsys):
    root, _ = shards
    argv = ["probe", "--data.shard-root", str(root), "--attributes", "age", "colour"]
    err = error_of([*argv, "--out", str(tmp_path)], capsys)
    assert "no label column 'age'" in err and "available: colour, shape, noise" in err


def test_class_with_fewer_than_two_images_in_a_split(tmp_path, capsys):
    root = tmp_path / "shards"
    rare = ["common"] * 119 + ["rare"]
    make_shards(root, n=120, labels={"kind": rare})
    argv = ["probe", "--data.shard-root", str(root), "--attributes", "kind", "--out", str(tmp_path)]
    err = error_of(argv, capsys)
    assert "attribute 'kind': class 'rare' has" in err and "at least 2" in err


def test_missing_labels_are_dropped_and_counted(tmp_path, capsys):
    root = tmp_path / "shards"
    rng = np.random.default_rng(0)
    colours = [COLOURS[i] for i in rng.integers(0, 3, size=150)]
    colours[:7] = [""] * 7
    make_shards(root, n=150, labels={"tint": colours})
    out = tmp_path / "out"
    argv = ["probe", "--data.shard-root", str(root), "--attributes", "tint", "--out", str(out)]
    assert run([*argv, "--raw-token", "mean", *FAST]) == 0
    assert "tint: 7 image(s) without a label were dropped." in capsys.readouterr().out
    doc = json.loads((out / "report.json").read_text())
    info = doc["attributes"]["tint"]
    assert info["n_missing"] == 7 and info["n_train"] + info["n_test"] == 143
    assert doc["probes"]["raw-mean"]["tint"]["n"] == info["n_test"]


def test_official_split_required_but_absent(shards, tmp_path, capsys):
    root, _ = shards
    argv = [
        "probe",
        "--data.shard-root",
        str(root),
        "--attributes",
        "colour",
        "--out",
        str(tmp_path),
    ]
    err = error_of([*argv, "--split-by", "official"], capsys)
    assert "has no official split" in err and "--split-by random" in err


def test_checkpoint_width_mismatch(shards, tmp_path, capsys):
    root, md = shards
    ckpt = make_ckpt(tmp_path / "ckpt", md, d_vit=8)
    argv = ["probe", "--data.shard-root", str(root), "--ckpt", str(ckpt), "--attributes", "colour"]
    err = error_of([*argv, "--out", str(tmp_path / "out")], capsys)
    assert "SAE d_vit=8" in err and "d_vit=16" in err


def test_checkpoint_layer_mismatch(shards, tmp_path, capsys):
    root, md = shards
    ckpt = make_ckpt(tmp_path / "ckpt", md, layer=3)
    argv = ["probe", "--data.shard-root", str(root), "--ckpt", str(ckpt), "--attributes", "colour"]
    err = error_of([*argv, "--out", str(tmp_path / "out")], capsys)
    assert "trained on layer 3" in err and "recorded layers [2, 5]" in err


def test_cls_token_asked_of_a_vit_without_one_writes_nothing(tmp_path, capsys):
    root = tmp_path / "shards"
    make_shards(root, n=60, cls_token=False)
    out = tmp_path / "out"
    argv = ["probe", "--data.shard-root", str(root), "--attributes", "colour", "--out", str(out)]
    err = error_of(argv, capsys)
    assert "--raw-token cls asked, but this ViT has no CLS token" in err
    assert "--raw-token mean" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lams"], "--lams []: expected one or more L2 strengths > 0."),
        (["--lams", "0.1", "0"], "--lams [0.1, 0.0]: expected one or more L2 strengths > 0."),
        (["--max-iter", "0"], "--max-iter 0: expected whole numbers >= 1."),
        (["--batch-size", "0"], "--batch-size 0: expected whole numbers >= 1."),
        (["--top-k", "5", "0"], "--top-k 5 0: expected whole numbers >= 1."),
        (["--top-latents", "0"], "--top-latents 0: expected whole numbers >= 1."),
        (["--min-cell-images", "-1"], "--min-cell-images -1: expected whole numbers >= 1."),
        (["--val-frac", "1"], "--val-frac 1.0; expected a fraction in (0, 1)."),
    ],
)
def test_unusable_flag_values_write_nothing(shards, tmp_path, capsys, flags, message):
    root, _ = shards
    out = tmp_path / "out"
    argv = ["probe", "--data.shard-root", str(root), "--attributes", "colour", "--out", str(out)]
    assert error_of([*argv, *flags], capsys) == f"error: {message}"
    assert not out.exists()


def test_unrecorded_layer_for_raw_probe(shards, tmp_path, capsys):
    root, _ = shards
    argv = ["probe", "--data.shard-root", str(root), "--attributes", "colour", "--layer", "4"]
    err = error_of([*argv, "--out", str(tmp_path)], capsys)
    assert "layer 4 was not recorded" in err


@pytest.mark.browser
def test_report_renders_without_console_errors(shards, tmp_path, page):
    root, md = shards
    ckpt = make_ckpt(tmp_path / "ckpt", md)
    out = tmp_path / "out"
    argv = ["probe", "--data.shard-root", str(root), "--ckpt", str(ckpt)]
    argv += ["--attributes", "colour", "shape", "--out", str(out), "--raw-token", "mean"]
    argv += ["--pool", "mean", "--top-k", "1", "--min-cell-images", "5", *FAST]
    assert run(argv) == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["alignment"]["sae-mean"]["colour"]["top"]["red"][0]["latent"] == 0
    page.goto((out / "report.html").as_uri())
    page.wait_for_load_state("load")
    assert page.errors == []
    assert page.title() == "saev probe report"
    assert page.locator("h2").all_inner_texts() == [
        "Attributes",
        "Probes",
        "Latent alignment",
        "Ablations of the top aligned latents",
        "Targeted ablation (TPP)",
        "Intersectional cells",
    ]
    # Every plot loaded (naturalWidth is 0 for a broken image).
    widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
    assert len(widths) >= 4 and min(widths) > 0
