"""`saev demo` end to end on CPU: every artefact exists, parses, loads and renders."""

import csv
import json
import pathlib
import urllib.parse

import pytest

import saev.nn
from saev import demo
from saev.__main__ import run
from saev.shards import Shards


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    code = run(["demo", "--out", str(out), "--n-imgs", "120", "--n-train", "60_000"])
    assert code == 0
    return out


@pytest.mark.slow
def test_demo_writes_every_artefact(demo_out, capsys):
    shards = demo.only_child(demo_out / "shards", "metadata.json")
    s = Shards(shards)
    assert s.md.n_imgs == 120 and s.md.pretrained is False  # random weights, said plainly
    assert {"colour", "shape", "size", "noise"} <= set(s.images.label_names)

    run_dir = demo.only_child(demo_out / "runs", "run.json")
    summary = json.loads((run_dir / "summary.json").read_text())
    names = [m["name"] for m in summary["members"]]
    assert len(names) == 4 and {m["family"] for m in summary["members"]} == {"topk", "relu"}

    with open(demo_out / "eval" / "sweep.csv", newline="") as fd:
        rows = {r["name"]: r for r in csv.DictReader(fd)}
    assert set(rows) == set(names)
    assert (demo_out / "eval" / "pareto.png").stat().st_size > 1000
    for name in names:
        sae = saev.nn.load(run_dir / "members" / name)
        assert sae.d_vit == s.md.d_vit and sae.d_sae == 8 * s.md.d_vit
        assert 0 < float(rows[name]["fvu"]) < 1

    report = json.loads((demo_out / "probe" / "report.json").read_text())
    assert report["latents_of_interest"]
    # Every latent the probe report links to has a visuals page.
    for latent in report["latents_of_interest"]:
        assert (demo_out / "visuals" / "latents" / f"{latent}.html").is_file()
    assert (demo_out / "index.html").is_file()


@pytest.mark.slow
@pytest.mark.browser
def test_demo_pages_render_without_errors(demo_out, page, tmp_path):
    for rel in ("index.html", "visuals/index.html", "probe/report.html"):
        page.goto((demo_out / rel).as_uri())
        page.wait_for_load_state("load")
        page.screenshot(path=str(tmp_path / (rel.replace("/", "_") + ".png")))
        # Eager images must have loaded; lazy ones (thumbnails below the fold, which a headless
        # page never scrolls to) must at least point at files that exist.
        imgs = page.evaluate(
            "Array.from(document.images).map(i => [i.loading, i.src, i.complete && i.naturalWidth > 0])"
        )
        assert imgs, rel
        assert all(ok for loading, _, ok in imgs if loading != "lazy"), rel
        for _, src, _ in imgs:
            assert pathlib.Path(urllib.parse.unquote(urllib.parse.urlparse(src).path)).is_file(), (
                src
            )
    assert page.errors == []
    # The index links every step's output, and the links resolve to files.
    page.goto((demo_out / "index.html").as_uri())
    hrefs = page.eval_on_selector_all("a", "els => els.map(e => e.getAttribute('href'))")
    for href in hrefs:
        assert (demo_out / href).exists(), href


def test_demo_refuses_a_foreign_nonempty_directory(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("precious")
    assert run(["demo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a saev demo directory" in err and err.count("\n") == 1
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_pick_best_prefers_sparse_members(tmp_path):
    path = tmp_path / "sweep.csv"
    path.write_text(
        "name,family,d_sae,l0_mean,fvu,explained_variance\n"
        "dense,relu,512,300,0.01,0.99\n"
        "a,topk,512,16,0.20,0.80\n"
        "b,topk,512,32,0.10,0.90\n"
    )
    assert demo.pick_best(path)[0] == "b"
