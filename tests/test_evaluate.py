"""`saev evaluate` on checkpoints: outputs and bad input."""

import io
import json

import pytest
import torch
from factories import tiny_shards

from saev.__main__ import run
from saev.shards import Shards, iter_images
from saev.train.config import Config, DataConfig, SaeConfig
from saev.train.main import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    shards = tiny_shards(root / "s")
    cfg = Config(
        data=DataConfig(shard_root=shards, layer=3, batch_size=128),
        sae=SaeConfig(family="batchtopk", exp_factor=2, k=3),
        n_train=1024,
        lr=3e-3,
        n_init_sample=256,
        run_root=root / "runs",
        device="cpu",
    )
    return shards, train(cfg)


def test_one_checkpoint_dir(tmp_path, trained, capsys):
    shards, run_dir = trained
    ckpt = run_dir / "members" / "000-batchtopk"
    assert (
        run(["evaluate", "--ckpt", str(ckpt), "--out", str(tmp_path), "--data.n-tokens", "64"]) == 0
    )
    doc = json.loads((tmp_path / "000-batchtopk" / "evaluation.json").read_text())
    assert doc["n_tokens"] == 64 and doc["split"] == "eval" and doc["layer"] == 3
    assert doc["l0_mean"] == pytest.approx(3.0, abs=1.5)  # BatchTopK's inference threshold
    assert sum(doc["log10_freq_hist"]["counts"]) + doc["n_dead"] == doc["d_sae"]
    assert "| 000-batchtopk | batchtopk | 32 |" in capsys.readouterr().out
    for name in (
        "pareto.png",
        "sweep.csv",
        "sweep.md",
        "000-batchtopk/freq_hist.png",
        "000-batchtopk/latent_freq.npy",
    ):
        assert (tmp_path / name).stat().st_size > 0


def test_bad_ckpt_and_d_vit_mismatch(tmp_path, trained, capsys):
    _, run_dir = trained
    assert run(["evaluate", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: --ckpt {tmp_path / 'nope'}: no such file or directory."
    )
    assert run(["evaluate", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint here" in capsys.readouterr().err
    other = tiny_shards(tmp_path / "other", d=8)
    argv = [
        "evaluate",
        "--ckpt",
        str(run_dir),
        "--data.shard-root",
        str(other),
        "--out",
        str(tmp_path / "o"),
    ]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"SAE d_vit=16 but {other} holds d_vit=8.") and "\n" not in err


def test_wandb_offline_needs_no_network(tmp_path, trained, monkeypatch):
    shards, _ = trained
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = Config(
        data=DataConfig(shard_root=shards, layer=3, batch_size=128),
        sae=SaeConfig(exp_factor=2, k=3),
        n_train=512,
        n_init_sample=256,
        run_root=tmp_path,
        device="cpu",
        log_every=1,
    )
    cfg = Config(**{**cfg.__dict__, "wandb": cfg.wandb.__class__(mode="offline")})
    run_dir = train(cfg)
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_saev_01_sae_is_scored_on_calibrated_inputs(tmp_path, trained):
    """A 0.1 sae.pt "trained" on normalised activations (its decoder spans the top 6 principal
    directions, +-each) projects centred inputs on them; evaluate must re-estimate the mean and
    scale from the shards, which gives FVU = the variance outside those 6 directions."""
    shards, _ = trained
    batches = iter_images(Shards(shards), 3, batch_size=1000, tokens="patches")
    x = torch.cat([b.reshape(-1, b.shape[-1]) for _, b in batches]).double()
    xc = x - x.mean(0)
    evals, evecs = torch.linalg.eigh(xc.T @ xc)
    U = evecs[:, -6:].T.float()  # [6, d] unit rows
    W_dec = torch.cat([U, -U])
    state = {"W_enc": W_dec.T.contiguous(), "b_enc": torch.zeros(12), "W_dec": W_dec}
    buf = io.BytesIO()
    torch.save({**state, "b_dec": torch.zeros(16)}, buf)
    header = {"schema": 1, "cfg": {"d_vit": 16, "exp_factor": 0.75, "seed": 0}}
    path = tmp_path / "sae.pt"
    path.write_bytes((json.dumps(header) + "\n").encode() + buf.getvalue())
    argv = ["evaluate", "--ckpt", str(path), "--data.shard-root", str(shards), "--data.layer"]
    argv += ["3", "--data.tokens", "patches", "--data.n-tokens", "0", "--out", str(tmp_path / "o")]
    assert run(argv) == 0
    (doc_path,) = (tmp_path / "o").glob("*/evaluation.json")
    doc = json.loads(doc_path.read_text())
    expected = float(evals[:-6].sum() / evals.sum())
    assert doc["n_tokens"] == x.shape[0] and doc["split"] == "all"
    assert doc["fvu"] == pytest.approx(expected, rel=1e-3)
    # Without calibration the SAE would drop the mean's part outside those directions.
    raw = x.float() @ U.T @ U
    assert float((raw - x.float()).pow(2).sum() / xc.pow(2).sum()) > 2.5 * expected
