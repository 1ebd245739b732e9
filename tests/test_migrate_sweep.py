"""saev 0.1 sweep files: read as the saev sweep they mean, every incompatibility at once."""

import json

import pytest
import torch
from saev01 import make_world

import saev.nn
from saev import migrate
from saev.__main__ import run
from saev.errors import UserError
from saev.train import sweep
from saev.train.config import Config

# The sweep example of 0.1's guide, at this recording's width (d_vit 16).
GUIDE = """
[sae]
sparsity_coeff = [4e-4, 8e-4]
d_vit = 16
exp_factor = [2, 4]

[data]
scale_mean = true
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("saev01"), 4)


def expand(tmp_path, text: str, **flags) -> list[sweep.Member]:
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    return sweep.expand(sweep.replace(Config(), {"sweep": path, **flags}))


def test_the_01_guides_sweep_runs_as_it_is(world, tmp_path, capsys):
    """Before: three errors, one at a time (sae.d_vit, data.scale_mean, then sparsity_coeff not
    applying to the default family topk)."""
    members = expand(tmp_path, GUIDE, **{"data.shard_root": world.shards})
    got = sorted(
        (m.cfg.sae.family, m.cfg.sae.exp_factor, m.cfg.sae.sparsity_coeff) for m in members
    )
    assert got == [
        ("relu", 2, pytest.approx(4e-4 * 4)),
        ("relu", 2, pytest.approx(8e-4 * 4)),
        ("relu", 4, pytest.approx(4e-4 * 4)),
        ("relu", 4, pytest.approx(8e-4 * 4)),
    ]
    err = capsys.readouterr().err
    assert "saev 0.1 key sae.d_vit = 16 -> dropped" in err
    assert "sae.sparsity_coeff = [0.0016, 0.0032]" in err and 'family = "relu"' in err


def test_every_incompatibility_is_reported_at_once(world, tmp_path):
    bad = """
    n_lr_warmup = 10
    [sae]
    d_vit = 768
    ghost_grads = true
    sparsity_coeff = 4e-4
    normalize_w_dec = false
    bogus = 1
    [data]
    scale_norm = false
    clamp = 10.0
    patches = "meanpool"
    """
    with pytest.raises(UserError) as info:
        expand(tmp_path, bad, **{"data.shard_root": world.shards})
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'sweep.toml'}: saev 0.1 keys")
    for part in (
        f"'sae.d_vit' = 768 (the shards at {world.shards} hold d_vit=16",
        "'sae.ghost_grads' = true (saev has no ghost gradients; topk and batchtopk",
        "'sae.normalize_w_dec' = false (saev always keeps decoder rows at unit norm",
        "'data.scale_norm' = false (saev always normalises",
        "'data.clamp' = 10 (saev does not clamp",
        "'data.patches' = \"meanpool\" (saev trains on tokens",
        "'sae.bogus' (neither a saev nor a saev 0.1 key)",
    ):
        assert part in msg, part


def test_translations(world, tmp_path):
    text = """
    lr = [3e-4, 1e-3]
    n_lr_warmup = 5
    n_sparsity_warmup = 2
    sae_batch_size = 64
    n_patches = 10_000
    track = false
    wandb_project = "p"
    tag = "baseline"
    ckpt_path = "ckpts"
    n_workers = 32
    [sae]
    exp_factor = 2
    seed = 7
    remove_parallel_grads = true
    [objective]
    sparsity_coeff = 1e-3
    [data]
    shard_root = "SHARDS"
    patches = "cls"
    layer = -2
    n_random_samples = 4096
    """.replace("SHARDS", str(world.shards))
    members = expand(tmp_path, text)
    cfg = members[0].cfg
    assert [m.cfg.lr for m in members] == [3e-4, 1e-3]
    assert (cfg.lr_warmup, cfg.sae.sparsity_warmup, cfg.data.batch_size) == (320, 128, 64)
    assert (cfg.n_train, cfg.seed, cfg.n_init_sample) == (10_000, 7, 4096)
    assert (cfg.wandb.mode, cfg.wandb.project, cfg.wandb.tags) == ("disabled", "p", ("baseline",))
    assert str(cfg.run_root) == "ckpts" and (cfg.data.tokens, cfg.data.layer) == ("cls", -2)
    assert cfg.sae.family == "relu" and cfg.sae.sparsity_coeff == pytest.approx(1e-3 * 4)


def test_d_vit_is_checked_against_the_command_line_shards(world, tmp_path, capsys):
    """--data.shard-root overrides the file's shards, so its d_vit is the one checked."""
    text = GUIDE.replace("[data]", '[data]\nshard_root = "/nowhere"')
    assert len(expand(tmp_path, text, **{"data.shard_root": world.shards})) == 4
    with pytest.raises(UserError, match="/nowhere"):
        expand(tmp_path, text)


def test_sparsity_needs_a_width(tmp_path):
    with pytest.raises(UserError, match="needs the shards' d_vit to convert it"):
        expand(tmp_path, "[sae]\nsparsity_coeff = 4e-4\n[data]\nscale_mean = true\n")


def test_saev_files_are_untouched(world, tmp_path):
    """No 0.1-only key: a saev file, with saev's meaning and saev's errors for unknown keys."""
    text = '[sae]\nfamily = "relu"\nsparsity_coeff = 4e-4\n'
    (m,) = expand(tmp_path, text, **{"data.shard_root": world.shards})
    assert m.cfg.sae.sparsity_coeff == 4e-4
    with pytest.raises(UserError, match=r"unknown key 'sae.bogus'; allowed keys at \[sae\]: "):
        expand(tmp_path, "[sae]\nbogus = 1\n")
    with pytest.raises(UserError, match="does not apply to family topk"):
        expand(tmp_path, "[sae]\nsparsity_coeff = 4e-4\n")
    raw = {"lr": 1e-3, "sae": {"k": [8, 16]}}
    assert migrate.translate_sweep(raw, source="f", known=sweep.fields()) is raw


def test_train_on_01_shards_with_a_01_sweep(world, tmp_path, capsys):
    path = tmp_path / "sweep.toml"
    path.write_text("n_patches = 128\nsae_batch_size = 16\n" + GUIDE)
    argv = ["train", "--sweep", str(path), "--data.shard-root", str(world.shards), "--run-root"]
    argv += [str(tmp_path / "runs"), "--device", "cpu", "--n-eval", "0"]
    assert run(argv) == 0
    (run_file,) = (tmp_path / "runs").glob("*/run.json")
    members = json.loads(run_file.read_text())["members"]
    assert len(members) == 4
    for m in members:
        assert m["config"]["sae"]["family"] == "relu"
        assert m["config"]["data"]["tokens"] == "patches"  # saev's default, 0.1's patches
    assert capsys.readouterr().out.count("| ok |") == 4


def test_the_converted_coefficient_is_01s_trade_off():
    """On the same (scaled) tokens, saev's relu loss with the converted coefficient is d_vit
    times 0.1's loss, mean over elements of (x_hat - x)^2 + lam01 * sum f: the same optimum.
    Ties the conversion to saev's loss (a change in its L1 weighting fails here)."""
    d, lam01 = 16, 4e-4
    raw = {"sae": {"sparsity_coeff": lam01, "d_vit": d}}
    lam = migrate.translate_sweep(raw, source="s", known=sweep.fields())["sae"]["sparsity_coeff"]
    stack = saev.nn.make_stack("relu", d_vit=d, d_sae=32, members=[{"sparsity_coeff": lam}])
    x = torch.randn(256, d, generator=torch.Generator().manual_seed(0)) * 3 + 1
    stack.init_from_data(x)
    with torch.no_grad():
        out = stack(x, warmup=1.0)
    s = stack.scale[0]
    f = out.f[0]
    mse01 = (s * out.x_hat[0] - s * x).pow(2).mean()
    sparsity01 = lam01 * f.sum(-1).mean()
    assert float(out.losses["sparsity"][0]) > 0
    torch.testing.assert_close(out.losses["recon"][0], d * mse01, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.losses["sparsity"][0], d * sparsity01, rtol=1e-4, atol=1e-8)
