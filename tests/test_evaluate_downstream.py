"""`saev evaluate --downstream`: SAEs spliced into a tiny random timm ViT with a classifier."""

import json
import shutil

import numpy as np
import pytest
import torch
from test_vits import tiny_clip_config  # noqa: F401 (fixture)

import saev.downstream
import saev.nn
from saev.__main__ import run
from saev.activations import Config as RecordConfig
from saev.activations import record
from saev.errors import UserError
from saev.images import HF, Demo
from saev.shards import Shards
from saev.shards.shuffled import split_images
from saev.vits import make_vit

# test_vit: 160 px, 10x10 patches, CLS, d=64, 6 blocks, a 1000-class head.
LAYER, N_IMGS, EVAL_FRAC = 3, 16, 0.25


def record_demo(root, family="timm", ckpt="test_vit", seed=42):
    images = Demo(root=root / "imgs", n_imgs=N_IMGS, size=32)
    cfg = RecordConfig(
        vit_family=family,
        vit_ckpt=ckpt,
        vit_layers=[LAYER if family == "timm" else 1],
        random_weights=True,
        images=images,
        dump_to=root / "dump",
        batch_size=N_IMGS,
        n_workers=0,
        device="cpu",
        seed=seed,
    )
    return record(cfg)


def save(stack, i, path, shards, layer, tokens="patches"):
    extra = {
        "layer": layer,
        "tokens": tokens,
        "shards": shards.md.to_json(),
        "shard_root": str(shards.root),
        "split": {"eval_frac": EVAL_FRAC, "seed": 0},
    }
    return saev.nn.save(stack, i, path, extra)


def train_tokens(shards, layer, sl) -> torch.Tensor:
    train_idx, _ = split_images(shards.n_imgs, EVAL_FRAC, 0)
    pos = shards.layer_pos(layer)
    return torch.from_numpy(
        np.concatenate([shards.img_acts(i)[pos, sl] for i in train_idx.tolist()])
    ).float()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Shards of test_vit's block 3 and three SAEs on its patches: k=1, k=32, and a
    mean-ablation "SAE" (zero decoder, b_dec = the floor's patch mean)."""
    root = tmp_path_factory.mktemp("ds")
    shards = Shards(record_demo(root))
    x = train_tokens(shards, LAYER, slice(1, None))
    torch.manual_seed(0)
    stack = saev.nn.make_stack("topk", d_vit=64, d_sae=256, members=[{"k": 1}, {"k": 32}])
    stack.init_from_data(x)
    opt = saev.nn.StackAdam(stack, lr=3e-3)
    for _ in range(25):
        out = stack(x[torch.randint(len(x), (256,))])
        opt.zero_grad()
        out.losses["total"].sum().backward()
        opt.step(out.losses["total"])
    paths = [save(stack, i, root / name, shards, LAYER) for i, name in enumerate(["k1", "k32"])]

    train_idx, _ = split_images(shards.n_imgs, EVAL_FRAC, 0)
    mean = saev.downstream.layer_mean(shards, LAYER, train_idx)
    ablate = saev.nn.make_stack("topk", d_vit=64, d_sae=16, members=[{"k": 1}])
    with torch.no_grad():
        ablate.W_dec.zero_()
        ablate.b_dec[0] = mean[1]
        ablate.scale.fill_(1.0)
    paths.append(save(ablate, 0, root / "mean", shards, LAYER))
    return root, shards, paths


@pytest.fixture(scope="module")
def evaluated(ckpts, tmp_path_factory):
    root, _, paths = ckpts
    out = tmp_path_factory.mktemp("out")
    argv = ["evaluate", "--ckpt", *map(str, paths), "--out", str(out), "--downstream"]
    argv += ["--downstream.n-workers", "0", "--downstream.batch-size", "3"]
    assert run(argv) == 0
    docs = {p.name: json.loads((out / p.name / "evaluation.json").read_text()) for p in paths}
    return out, {name: doc["downstream"] for name, doc in docs.items()}


def test_error_term_added_back_is_exactly_clean(evaluated):
    _, ds = evaluated
    for doc in ds.values():
        et = doc["error_term"]
        assert et["kl"] == 0.0 and et["recovered_kl"] == 1.0 and et["recovered_cosine"] == 1.0
        assert et["top1_agreement"] == 1.0
        assert doc["n_imgs"] == 4 and doc["split"] == "eval" and doc["has_head"]
        assert doc["n_mean_imgs"] == 12 and doc["tokens"] == "patches" and doc["layer"] == LAYER
        # The rebuilt random ViT reproduces the stored activations.
        assert doc["acts_rel_err"] < 1e-5


def test_mean_ablation_sae_recovers_nothing_and_k32_beats_k1(evaluated):
    _, ds = evaluated
    floor = ds["k1"]["floor"]
    assert floor["kl"] > 1e-3 and floor["cosine"] < 0.99
    assert all(d["floor"] == floor for d in ds.values())  # one floor pass, shared
    mean = ds["mean"]
    assert mean["kl"] == floor["kl"] and mean["cosine"] == floor["cosine"]
    assert mean["recovered_kl"] == 0.0 and mean["recovered_cosine"] == 0.0
    k1, k32 = ds["k1"], ds["k32"]
    assert 0.0 < k1["recovered_kl"] < k32["recovered_kl"] <= 1.0
    assert 0.0 < k1["recovered_cosine"] < k32["recovered_cosine"] <= 1.0
    assert k32["kl"] < k1["kl"] < floor["kl"] and k32["cosine"] > k1["cosine"] > floor["cosine"]
    # recovered = (floor - spliced) / (floor - clean), clean KL being 0.
    assert k1["recovered_kl"] == pytest.approx((floor["kl"] - k1["kl"]) / floor["kl"])


def test_tables_and_plot(evaluated):
    out, ds = evaluated
    header, *rows = (out / "sweep.csv").read_text().splitlines()
    cols = header.split(",")
    assert cols[-5:] == [
        "downstream_cosine",
        "downstream_kl",
        "top1_agreement",
        "recovered_kl",
        "recovered_cosine",
    ]
    row = dict(zip(cols, next(r for r in rows if r.startswith("k32,")).split(","), strict=True))
    assert float(row["recovered_kl"]) == pytest.approx(ds["k32"]["recovered_kl"])
    assert "recovered_kl" in (out / "sweep.md").read_text()
    assert (out / "pareto_downstream.png").stat().st_size > 1000


def test_layer_mean_is_per_token_class(ckpts):
    _, shards, _ = ckpts
    imgs = np.array([0, 5, 9])
    acts = np.stack([shards.img_acts(i)[0] for i in imgs]).astype(np.float64)
    mean = saev.downstream.layer_mean(shards, LAYER, imgs).numpy()
    np.testing.assert_allclose(mean[0], acts[:, 0].mean(0), rtol=1e-6)
    patch = acts[:, 1:].reshape(-1, 64).mean(0)
    np.testing.assert_allclose(mean[1:], np.broadcast_to(patch, (100, 64)), rtol=1e-6)


def test_random_vit_is_rebuilt_bit_identically_from_metadata(ckpts):
    _, shards, _ = ckpts
    assert shards.md.pretrained is False and shards.md.seed == 42
    vit = saev.downstream.rebuild_vit(shards)
    torch.manual_seed(42)  # what `saev activations` does before building the model
    want = make_vit("timm", "test_vit", pretrained=False)
    for a, b in zip(vit.model.state_dict().values(), want.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert vit.head is not None and vit.head.out_features == 1000


def test_missing_images_name_the_flag(ckpts, tmp_path, capsys):
    root, shards, paths = ckpts
    argv = ["evaluate", "--ckpt", str(paths[0]), "--out", str(tmp_path / "o"), "--downstream"]
    assert run([*argv, "--images.root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path}/images/") and "image not found" in err
    assert "pass --images.root DIR" in err and "\n" not in err
    assert not (tmp_path / "o").exists()  # nothing written
    # Images elsewhere with the same names but other pixels: the stored activations disagree.
    Demo(root=tmp_path / "other", n_imgs=N_IMGS, size=32, seed=1).load()
    assert (
        run([*argv, "--images.root", str(tmp_path / "other"), "--downstream.n-workers", "0"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert "does not reproduce the stored activations" in err and "\n" not in err
    # The recorded images, moved: found with --images.root; an undecodable one is left out.
    shutil.copytree(root / "imgs", tmp_path / "moved")
    _, eval_idx = split_images(N_IMGS, EVAL_FRAC, 0)
    (tmp_path / "moved" / Shards(shards.root).images.path(eval_idx[0])).write_bytes(b"\x89PNG")
    more = ["--images.root", str(tmp_path / "moved"), "--downstream.n-workers", "0"]
    assert run([*argv, *more, "--downstream.n-imgs", "2"]) == 0
    (doc,) = [json.loads(p.read_text()) for p in (tmp_path / "o").glob("*/evaluation.json")]
    ds = doc["downstream"]
    assert (ds["n_imgs"], ds["n_skipped"]) == (1, 1) and ds["acts_rel_err"] < 1e-5


def test_downstream_reopens_the_rows_of_an_hf_recording(tmp_path, capsys):
    """images:hf images are dataset rows, not files: downstream reads the held-out rows back
    from the save_to_disk directory (recorded, or moved and named by --images.root)."""
    datasets = pytest.importorskip("datasets")
    import PIL.Image

    demo = Demo(root=tmp_path / "imgs", n_imgs=N_IMGS, size=32).load()
    rows = {"image": [PIL.Image.open(demo.root / p) for p in demo.paths]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "hf"))
    cfg = RecordConfig(
        vit_family="timm",
        vit_ckpt="test_vit",
        vit_layers=[LAYER],
        random_weights=True,
        images=HF(name=str(tmp_path / "hf")),
        dump_to=tmp_path / "dump",
        batch_size=N_IMGS,
        n_workers=0,
        device="cpu",
        seed=42,
    )
    shards = Shards(record(cfg))
    stack = saev.nn.make_stack("topk", d_vit=64, d_sae=64, members=[{"k": 8}])
    stack.init_from_data(train_tokens(shards, LAYER, slice(1, None)))
    path = save(stack, 0, tmp_path / "sae", shards, LAYER)
    argv = ["evaluate", "--ckpt", str(path), "--out", str(tmp_path / "o"), "--downstream"]
    argv += ["--downstream.n-workers", "0"]
    assert run(argv) == 0
    doc = json.loads((tmp_path / "o" / "sae" / "evaluation.json").read_text())["downstream"]
    assert (doc["n_imgs"], doc["n_skipped"]) == (4, 0) and doc["acts_rel_err"] < 1e-5
    assert doc["error_term"]["kl"] == 0.0 and doc["error_term"]["top1_agreement"] == 1.0
    shutil.move(tmp_path / "hf", tmp_path / "moved")
    shutil.rmtree(tmp_path / "o")
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'hf'} (the dataset recorded in ") and "\n" not in err
    assert err.endswith("pass --images.root, the save_to_disk directory where it is now.")
    assert run([*argv, "--images.root", str(tmp_path / "moved")]) == 0
    moved = json.loads((tmp_path / "o" / "sae" / "evaluation.json").read_text())["downstream"]
    assert moved["kl"] == doc["kl"] and moved["acts_rel_err"] == doc["acts_rel_err"]


def test_downstream_flags_need_downstream(ckpts, tmp_path, capsys):
    _, _, paths = ckpts
    argv = ["evaluate", "--ckpt", str(paths[0]), "--out", str(tmp_path / "o")]
    assert run([*argv, "--downstream.n-imgs", "5"]) == 2
    assert "only apply with --downstream" in capsys.readouterr().err
    assert run([*argv, "--downstream", "--downstream.batch-size", "0"]) == 2
    assert "--downstream.batch-size 0: expected >= 1." in capsys.readouterr().err


def test_model_without_head_reports_cosine_only(tmp_path, tiny_clip_config):  # noqa: F811
    """A tiny CLIP (no classifier), an SAE on all tokens (CLS and patches)."""
    shards = Shards(record_demo(tmp_path, family="clip", ckpt=tiny_clip_config))
    x = train_tokens(shards, 1, slice(None))
    stack = saev.nn.make_stack("topk", d_vit=32, d_sae=64, members=[{"k": 4}])
    stack.init_from_data(x)
    sae = saev.nn.load(save(stack, 0, tmp_path / "sae", shards, 1, tokens="all"))
    _, eval_idx = split_images(shards.n_imgs, EVAL_FRAC, 0)
    cfg = saev.downstream.DownstreamConfig(n_workers=0)
    (doc,) = saev.downstream.evaluate(
        [sae], shards, 1, "all", eval_imgs=eval_idx, mean_imgs=np.arange(12), cfg=cfg
    )
    assert doc["has_head"] is False and doc["kl"] is None and doc["top1_agreement"] is None
    assert doc["recovered_kl"] is None and doc["floor"]["kl"] is None
    assert doc["error_term"]["recovered_cosine"] == 1.0 and doc["acts_rel_err"] < 1e-5
    # An untrained SAE: worse than the floor is possible; the formula still holds.
    assert doc["floor"]["cosine"] < 1.0 and doc["cosine"] < 1.0
    want = (doc["cosine"] - doc["floor"]["cosine"]) / (1.0 - doc["floor"]["cosine"])
    assert doc["recovered_cosine"] == pytest.approx(want, rel=1e-9)


def test_recovered_and_spread():
    assert saev.downstream.recovered(2.0, 0.5, 0.0) == 0.75
    assert saev.downstream.recovered(1.0, 1.0, 1.0) is None  # floor costs nothing: undefined
    assert saev.downstream.recovered(None, 0.5, 0.0) is None
    idx = np.arange(10, 20)
    assert saev.downstream.spread(idx, 4).tolist() == [10, 12, 15, 17]
    assert saev.downstream.spread(idx, 0).tolist() == idx.tolist()
    with pytest.raises(UserError, match="--downstream.n-imgs -1: expected >= 0."):
        saev.downstream.check_config(saev.downstream.DownstreamConfig(n_imgs=-1))
