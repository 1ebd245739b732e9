"""`saev train` end to end on tiny CPU shards: sweeps, checkpoints, resume, NaN guard, errors."""

import json
import math
import os
import pathlib
import platform
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from factories import tiny_shards, write_shards
from safetensors.torch import load_file

import saev.nn
from saev.__main__ import run
from saev.evaluate import Metrics
from saev.shards import Shards, iter_images
from saev.shards.shuffled import split_images
from saev.train import schedules
from saev.train.config import Config, DataConfig
from saev.train.main import train

D = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> pathlib.Path:
    return tiny_shards(tmp_path_factory.mktemp("shards") / "s")


SWEEP = """
n_train = 3072
lr = 3e-3
lr_warmup = 256
ckpt_every = 1024
log_every = 4
n_init_sample = 512
[data]
layer = -1
batch_size = 128
eval_frac = 0.25
n_threads = 2
[sae]
family = ["topk", "relu"]
exp_factor = 2
k = [2, 4]
sparsity_coeff = [0.1, 1.0]
"""


def sweep_cfg(tmp_path, shards, text=SWEEP, **kw) -> Config:
    path = tmp_path / "grid.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return Config(
        sweep=path,
        data=DataConfig(shard_root=shards),
        run_root=tmp_path / "runs",
        device="cpu",
        **kw,
    )


def eval_fvu(sae, shards_root: pathlib.Path) -> float:
    """FVU of a loaded SAE over its eval split, computed here from the ordered reader."""
    shards = Shards(shards_root)
    split = sae.cfg["split"]
    _, ev = split_images(shards.n_imgs, split["eval_frac"], split["seed"])
    m = Metrics(1, sae.d_vit, sae.d_sae)
    with torch.no_grad():
        for i in ev.tolist():
            _, x = next(
                iter_images(shards, sae.layer, batch_size=1, tokens=sae.tokens, start=i, stop=i + 1)
            )
            x = x.reshape(-1, sae.d_vit)
            f = sae.encode(x)
            m.update(x, sae.decode(f)[None], f[None])
    return m.result()[0]["fvu"]


def test_sweep_over_two_families_trains_and_checkpoints_reproduce(tmp_path, shards, capsys):
    run_dir = train(sweep_cfg(tmp_path, shards))
    out = capsys.readouterr().out
    assert "plan: 4 member(s) in 2 stacked group(s), 1 pass(es)" in out
    summary = json.loads((run_dir / "summary.json").read_text())["members"]
    assert sorted(m["name"] for m in summary) == [
        "000-topk-k2",
        "001-topk-k4",
        "002-relu-sparsity_coeff0.1",
        "003-relu-sparsity_coeff1",
    ]
    for row in summary:
        assert row["status"] == "ok" and row["ckpt_step"] == 24
        assert row["name"] in out
        sae = saev.nn.load(row["ckpt"])
        assert (sae.d_vit, sae.d_sae, sae.layer, sae.tokens) == (D, 2 * D, 3, "patches")
        assert sae.cfg["train"]["sae"]["family"] == row["family"]
        assert sae.cfg["shards"]["d_vit"] == D
        ev = row["eval"]
        assert ev["n_tokens"] == 12 * 16  # 12 eval images x 16 patches
        assert eval_fvu(sae, shards) == pytest.approx(ev["fvu"], rel=1e-5, abs=1e-7)
        assert ev["fvu"] < 0.9  # it learned something
        lines = [
            json.loads(x)
            for x in (run_dir / "members" / row["name"] / "metrics.jsonl").read_text().splitlines()
        ]
        assert [x["step"] for x in lines] == list(range(4, 25, 4))
        assert {"loss/recon", "loss/total", "l0", "fvu", "dead_frac", "lr", "tokens_per_s"} <= set(
            lines[0]
        )
    topk = [m for m in summary if m["family"] == "topk"]
    assert [m["eval"]["l0_mean"] for m in topk] == [2.0, 4.0]
    for name in ("sweep.csv", "sweep.md", "pareto.png"):
        assert (run_dir / "eval" / name).stat().st_size > 0
    assert (run_dir / "eval" / "000-topk-k2" / "freq_hist.png").is_file()

    # `saev evaluate` on the run directory gives the numbers training reported.
    assert (
        run(["evaluate", "--ckpt", str(run_dir), "--out", str(tmp_path / "ev"), "--device", "cpu"])
        == 0
    )
    for row in summary:
        doc = json.loads((tmp_path / "ev" / row["name"] / "evaluation.json").read_text())
        assert doc["fvu"] == pytest.approx(row["eval"]["fvu"], rel=1e-12)
        assert doc["split"] == "eval"
    csv_lines = (tmp_path / "ev" / "sweep.csv").read_text().splitlines()
    assert csv_lines[0].startswith("name,family,d_sae,l0_mean,fvu") and len(csv_lines) == 5

    # The same config again is refused with a pointer to --resume.
    with pytest.raises(Exception, match="already holds a finished run"):
        train(sweep_cfg(tmp_path, shards))


RESUME = """
n_train = 2560
lr = 3e-3
ckpt_every = 768
log_every = 2
n_init_sample = 512
[data]
layer = 3
batch_size = 128
buffer_mb = 0.01
chunk_mb = 0.002
[sae]
family = ["batchtopk", "jumprelu"]
exp_factor = 2
k = 4
sparsity_coeff = 0.05
"""


def metrics_without_timing(path: pathlib.Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}
        for x in path.read_text().splitlines()
    ]


@pytest.mark.parametrize("new_defaults", [False, True])
def test_resume_after_kill_equals_uninterrupted(
    tmp_path, shards, monkeypatch, capsys, new_defaults
):
    """Also with lr and hyperparameters left to the defaults and a saev whose defaults changed
    in between: the resumed members keep the values they started with."""
    text = RESUME.replace("lr = 3e-3\n", "") if new_defaults else RESUME
    whole = train(sweep_cfg(tmp_path / "a", shards, text))

    calls = {"n": 0}
    orig = saev.nn.StackAdam.step

    def dying_step(self, loss=None):
        calls["n"] += 1
        if calls["n"] == 2 * 13:  # step 13 of the second group: after the checkpoint at step 12
            raise KeyboardInterrupt
        return orig(self, loss)

    monkeypatch.setattr(saev.nn.StackAdam, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(sweep_cfg(tmp_path / "b", shards, text))
    monkeypatch.setattr(saev.nn.StackAdam, "step", orig)
    killed = tmp_path / "b" / "runs" / whole.name
    assert (
        json.loads((killed / "members" / "000-batchtopk" / "config.json").read_text())["step"] == 12
    )
    assert not (killed / "summary.json").exists()

    if new_defaults:
        monkeypatch.setattr(schedules, "FAMILY_LR_FACTOR", {"batchtopk": 2.0, "jumprelu": 8.0})
        monkeypatch.setattr(schedules, "DEFAULT_LR_WARMUP_FRAC", 0.1)
        monkeypatch.setitem(saev.nn.HPARAMS["batchtopk"], "threshold_decay", 0.5)
        monkeypatch.setitem(saev.nn.HPARAMS["jumprelu"], "bandwidth", 0.5)
        monkeypatch.setitem(saev.nn.HPARAMS["jumprelu"], "sparsity_coeff", 0.5)  # set: not kept
    capsys.readouterr()
    train(Config(resume=killed, device="cpu"))
    kept = [line for line in capsys.readouterr().out.splitlines() if "keeping the defaults" in line]
    assert len(kept) == (2 if new_defaults else 0)
    if new_defaults:
        assert kept[1] == (
            "member 001-jumprelu: keeping the defaults it started with, where this saev "
            "version's differ: lr 0.09051 (now 0.181), lr_warmup 128 (now 256), bandwidth 0.05 "
            "(now 0.5)"
        )
    for name in ("000-batchtopk", "001-jumprelu"):
        a = load_file(whole / "members" / name / "sae.safetensors")
        b = load_file(killed / "members" / name / "sae.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
        strip = metrics_without_timing
        assert strip(whole / "members" / name / "metrics.jsonl") == strip(
            killed / "members" / name / "metrics.jsonl"
        )
    sa = json.loads((whole / "summary.json").read_text())["members"]
    sb = json.loads((killed / "summary.json").read_text())["members"]
    assert [m["eval"]["fvu"] for m in sa] == [m["eval"]["fvu"] for m in sb]


def test_started_with_keeps_only_what_the_config_left_to_the_defaults(tmp_path):
    """`--resume` keeps a checkpoint's recorded defaults, never a value the config sets, and
    falls back to this version's defaults when the record is missing or unreadable."""
    import dataclasses

    from saev.train.loop import resolve, started_with
    from saev.train.sweep import Member

    cfg = Config(sae=dataclasses.replace(Config().sae, family="relu"), lr_warmup=500)
    m = Member(0, "000-relu", cfg, {})
    ckpt = tmp_path / "members" / m.name
    assert started_with(tmp_path, m) == {}  # no checkpoint: nothing to keep
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{not json")
    assert started_with(tmp_path, m) == {}
    record = {
        "family": "relu",
        "lr": 0.02,
        "lr_warmup": 123,
        "hparams": {"sparsity_coeff": 1.0, "seed": 7, "dead_after_tokens": 5, "gone": 1},
    }
    (ckpt / "config.json").write_text(json.dumps(record))
    kept = started_with(tmp_path, m)
    # lr_warmup is set in the config, seed comes from --seed, "gone" is no longer a key.
    assert kept == {"lr": 0.02, "sparsity_coeff": 1.0, "dead_after_tokens": 5}
    r = resolve(m, 512, kept)
    assert (r.lr, r.lr_warmup, r.hparams["sparsity_coeff"]) == (0.02, 500, 1.0)
    assert r.hparams["seed"] == 0
    set_lr = Member(0, m.name, dataclasses.replace(cfg, lr=1e-3), {})
    assert "lr" not in started_with(tmp_path, set_lr)
    (ckpt / "config.json").write_text(json.dumps({**record, "family": "gated"}))
    assert started_with(tmp_path, m) == {"lr": 0.02}  # another family's hparams do not apply


def test_nan_in_one_member_stops_only_it(tmp_path, shards, monkeypatch, capsys):
    text = SWEEP.replace('family = ["topk", "relu"]', 'family = "topk"').replace(
        "sparsity_coeff = [0.1, 1.0]\n", ""
    )
    text = text.replace("k = [2, 4]", "k = [2, 3, 4]")
    orig = saev.nn.TopKStack.forward
    calls = {"n": 0}

    def forward(self, x, warmup=1.0):
        out = orig(self, x, warmup)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= 10:  # from step 10 on, member 1's loss is NaN
                total = out.losses["total"].clone()
                total[1] = total[1] * float("nan")
                out.losses["total"] = total
        return out

    monkeypatch.setattr(saev.nn.TopKStack, "forward", forward)
    run_dir = train(sweep_cfg(tmp_path, shards, text))
    err = capsys.readouterr()
    assert (
        "member 001-topk-k3: non-finite loss (nan) or gradient at step 10; stopped it, its last good checkpoint (step 8) is kept; the others go on."
        in err.out + err.err
    )
    rows = {m["name"]: m for m in json.loads((run_dir / "summary.json").read_text())["members"]}
    assert rows["001-topk-k3"]["status"] == "stopped" and rows["001-topk-k3"]["ckpt_step"] == 8
    assert (
        json.loads((run_dir / "members" / "001-topk-k3" / "config.json").read_text())["step"] == 8
    )
    for name in ("000-topk-k2", "002-topk-k4"):
        assert rows[name]["status"] == "ok" and rows[name]["ckpt_step"] == 24
        assert rows[name]["eval"]["fvu"] < 0.9


def test_single_run_from_flags(tmp_path, shards, capsys, monkeypatch):
    monkeypatch.chdir(shards.parent)  # a relative --data.shard-root
    argv = [
        "train",
        "--data.shard-root",
        shards.name,
        "--data.layer",
        "-1",
        "--sae.family",
        "topk",
        "--sae.exp-factor",
        "2",
        "--sae.k",
        "4",
        "--lr",
        "4e-3",
        "--n-train",
        "1_024",
        "--data.batch-size",
        "128",
        "--run-root",
        str(tmp_path),
        "--device",
        "cpu",
        "--n-init-sample",
        "256",
    ]
    assert run(argv) == 0
    (run_dir,) = tmp_path.iterdir()
    (member,) = (run_dir / "members").iterdir()
    cfg = saev.nn.load(member).cfg
    assert cfg["hparams"]["k"] == 4
    assert cfg["shard_root"] == str(shards.resolve())  # absolute: usable from anywhere
    assert "| 000-topk | ok |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data.layer", "1"], "error: layer 1 was not recorded in .*; recorded layers: [2, 3]"),
        (
            ["--sae.family", "relu", "--sae.k", "3"],
            "error: the command line: --sae.k does not apply to family relu",
        ),
        ([], "error: no shard directory: pass --data.shard-root DIR"),
        (
            ["--data.shard-root", "/nonexistent"],
            "error: /nonexistent: shard directory does not exist.",
        ),
        (
            ["--n-train", "1000", "--lr-warmup", "1000"],
            "error: member 000-topk: lr_warmup=1,000 tokens must be >= 0 and below n_train=1,000",
        ),
        # D = 16, exp_factor 2: 32 latents; k = 33 used to train a dense member silently.
        (
            ["--sae.exp-factor", "2", "--sae.k", "33"],
            "error: member 000-topk: k=33 is more than the SAE's 32 latents (exp_factor 2 x d_vit 16)",
        ),
        (["--lr", "nan"], "error: member 000-topk: lr=nan; expected a finite number > 0."),
        (["--lr", "0"], "error: member 000-topk: lr=0.0; expected a finite number > 0."),
        (["--lr", "inf"], "error: member 000-topk: lr=inf; expected a finite number > 0."),
        (["--grad-clip", "-1"], "error: member 000-topk: grad_clip=-1.0; expected >= 0."),
        (
            ["--lr-decay-frac", "1.5"],
            "error: member 000-topk: lr_decay_frac=1.5; expected in [0, 1].",
        ),
        (
            ["--sae.exp-factor", "0"],
            "error: member 000-topk: sae.exp_factor=0; expected an integer >= 1.",
        ),
        (["--sae.k", "-3"], "error: topk hyperparameter k=-3: expected an integer >= 1."),
        (
            ["--sae.family", "relu", "--sae.sparsity-coeff", "nan"],
            "error: relu hyperparameter sparsity_coeff=nan: expected a finite number.",
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path, shards, capsys, argv, message):
    if "no shard" not in message and "--data.shard-root" not in argv:
        argv = ["--data.shard-root", str(shards), *argv]
    assert run(["train", "--run-root", str(tmp_path / "runs"), *argv]) == 2
    out, err = capsys.readouterr()
    err = err.strip()
    assert err.count("\n") == 0
    # Everything is checked before the plan is printed or the run directory created.
    assert "run directory" not in out and not (tmp_path / "runs").exists()
    import re

    assert re.match(re.escape(message).replace(r"\.\*", ".*"), err), err


def test_resume_on_other_d_vit_is_refused(tmp_path, shards, monkeypatch, capsys):
    cfg = Config(
        data=DataConfig(shard_root=shards, layer=3, batch_size=128),
        n_train=512,
        run_root=tmp_path,
        device="cpu",
        ckpt_every=256,
        n_init_sample=256,
        sae=Config().sae.__class__(exp_factor=2, k=4),
    )
    orig = saev.nn.StackAdam.step

    def dying_step(self, loss=None):
        if int(self.steps.max()) >= 3:
            raise KeyboardInterrupt
        return orig(self, loss)

    monkeypatch.setattr(saev.nn.StackAdam, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(saev.nn.StackAdam, "step", orig)
    (run_dir,) = tmp_path.iterdir()
    other = tiny_shards(tmp_path / "other", d=8)
    capsys.readouterr()
    code = run(["train", "--resume", str(run_dir), "--data.shard-root", str(other)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: --resume {run_dir}: the run was trained on d_vit={D}, but {other} holds d_vit=8; "
        "resume on the shards it was trained on."
    )


def test_default_lr_warmup_fits_short_runs():
    """A fixed 1M-token warmup kept a 200k-token run below a fifth of its peak lr (issue: FVU > 1)."""
    from saev.train.schedules import lr_at, lr_warmup_tokens

    assert lr_warmup_tokens(None, 200_000) == 10_000
    assert lr_warmup_tokens(None, 100_000_000) == 1_000_000
    assert lr_warmup_tokens(123, 200_000) == 123
    warmup = lr_warmup_tokens(None, 200_000)
    peak = max(lr_at(t, lr=4e-4, warmup=warmup, n_train=200_000) for t in range(0, 200_000, 2048))
    assert peak == pytest.approx(4e-4, rel=0.01)


def test_lr_schedule_holds_the_peak_then_decays_over_the_last_fifth():
    from saev.train.schedules import lr_at

    kw = dict(lr=1e-3, warmup=1000, n_train=100_000)
    assert lr_at(0, **kw) == pytest.approx(1e-6)
    assert lr_at(999, **kw) == pytest.approx(1e-3)
    # Held at the peak until 80% of the run, then linear to 0 at n_train.
    assert lr_at(1000, **kw) == lr_at(50_000, **kw) == lr_at(79_999, **kw) == 1e-3
    assert lr_at(90_000, **kw) == pytest.approx(0.5e-3)
    assert lr_at(100_000, **kw) == 0.0
    assert lr_at(90_000, **kw, decay="cosine") == pytest.approx(0.5e-3)
    assert lr_at(85_000, **kw, decay="cosine") == pytest.approx(
        1e-3 * (1 + math.cos(math.pi / 4)) / 2
    )
    assert lr_at(90_000, **kw, min_frac=0.1) == pytest.approx(0.55e-3)
    # decay_frac 1 decays from the end of warmup (the old schedule).
    assert lr_at(50_500, **kw, decay_frac=1.0) == pytest.approx(0.5e-3)
    assert lr_at(99_000, **kw, decay="constant") == 1e-3


def test_default_lr_scales_with_width_as_in_the_literature():
    from saev.train.schedules import default_lr

    assert default_lr(2**14) == pytest.approx(1e-3)
    assert default_lr(4 * 2**14) == pytest.approx(0.5e-3)  # 1/sqrt(width)
    assert default_lr(512) == pytest.approx(1e-3 * math.sqrt(32))
    for family in (
        "relu",
        "gated",
        "vsae-gated",
        "jumprelu",
        "vsae-jumprelu",
        "vsae-iso",
        "vsae-mixture",
    ):  # measured: docs/benchmarks.md
        assert default_lr(512, family=family) == pytest.approx(4e-3 * math.sqrt(32))
    for family in ("topk", "batchtopk", "matryoshka", "vsae-topk"):
        assert default_lr(512, family=family) == default_lr(512)


def test_the_resolved_default_lr_is_recorded_in_each_checkpoint(tmp_path, shards):
    from saev.train.schedules import default_lr

    text = SWEEP.replace("lr = 3e-3\n", "").split("family")[0] + 'family = "topk"\nk = [2, 4]\n'
    run = train(sweep_cfg(tmp_path, shards, text, n_eval=0))
    for member in (run / "members").iterdir():
        cfg = json.loads((member / "config.json").read_text())
        assert cfg["train"]["lr"] is None
        assert cfg["lr"] == pytest.approx(default_lr(cfg["d_sae"]))


def test_ctrl_c_saves_state_at_a_step_boundary_and_resume_is_exact(tmp_path, shards, monkeypatch):
    whole = train(sweep_cfg(tmp_path / "a", shards, RESUME))

    calls = {"n": 0}
    orig = saev.nn.StackAdam.step

    def step_then_ctrl_c(self, loss=None):
        calls["n"] += 1
        out = orig(self, loss)
        if calls["n"] == 2 * 7 - 1:  # during step 7, between the two groups' updates
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(saev.nn.StackAdam, "step", step_then_ctrl_c)
    # As in a terminal (CI may start us with SIGINT ignored, which training then respects).
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(sweep_cfg(tmp_path / "b", shards, RESUME))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    finally:
        signal.signal(signal.SIGINT, outer)
    monkeypatch.setattr(saev.nn.StackAdam, "step", orig)
    killed = tmp_path / "b" / "runs" / whole.name
    # Both groups finished step 7 before the state was saved (the periodic ones are at 6, 12).
    cfg = json.loads((killed / "members" / "000-batchtopk" / "config.json").read_text())
    assert cfg["step"] == 7

    train(Config(resume=killed, device="cpu"))
    for name in ("000-batchtopk", "001-jumprelu"):
        a = load_file(whole / "members" / name / "sae.safetensors")
        b = load_file(killed / "members" / name / "sae.safetensors")
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


def test_bfloat16_training_runs_and_evaluates_like_float32(tmp_path, shards):
    """--dtype bfloat16: matmuls under autocast, float32 weights and metrics, a close FVU."""
    text = SWEEP.replace("ckpt_every = 1024\n", "")
    runs = {
        dtype: train(sweep_cfg(tmp_path / dtype, shards, text, dtype=dtype))
        for dtype in ("float32", "bfloat16")
    }
    summaries = {
        dtype: {m["name"]: m for m in json.loads((run / "summary.json").read_text())["members"]}
        for dtype, run in runs.items()
    }
    for name, m32 in summaries["float32"].items():
        m16 = summaries["bfloat16"][name]
        assert m16["status"] == "ok"
        assert m16["eval"]["fvu"] == pytest.approx(m32["eval"]["fvu"], rel=0.1), name
        sae = saev.nn.load(runs["bfloat16"] / "members" / name)
        assert all(
            t.dtype == torch.float32
            for t in sae.stack.state_dict().values()
            if t.is_floating_point()
        )
        assert sae.cfg["train"]["dtype"] == "bfloat16"


def test_a_default_topk_run_recovers_a_planted_dictionary(tmp_path):
    """`saev train` at its defaults (lr, schedule, init, AuxK; only k and the token budget
    given) recovers most atoms of a planted dictionary. The strict numbers are
    benchmarks/peers.py's (MMCS 0.95+ on d=64, 256 atoms); this is the loose, fast version."""
    d, n_atoms, active, tpi, n_imgs = 32, 96, 3, 256, 1200
    rng = np.random.default_rng(7)
    atoms = rng.normal(size=(n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    n = n_imgs * tpi
    idx = np.argsort(rng.random((n, n_atoms)), axis=1)[:, :active]
    coef = rng.exponential(size=(n, active)) + 0.1
    acts = np.einsum("na,nad->nd", coef, atoms[idx]) + 0.5 * rng.normal(size=d)
    acts += 0.02 * rng.normal(size=(n, d))
    write_shards(
        tmp_path / "s",
        acts.reshape(n_imgs, 1, tpi, d).astype(np.float32),
        vit_ckpt="planted",
        n_blocks=1,
        cls_token=False,
        data={"kind": "planted"},
    )
    cfg = sweep_cfg(
        tmp_path,
        tmp_path / "s",
        f'n_train = {int(0.9 * n)}\n[data]\nlayer = 0\n[sae]\nfamily = "topk"\nk = {active}\n',
    )
    run_dir = train(cfg)
    (member,) = sorted((run_dir / "members").iterdir())
    W = saev.nn.load(member).stack.W_dec.detach()[0].double()
    cos = (torch.from_numpy(atoms) @ W.T).max(-1).values
    # At init the best of 256 random rows scores ~0.5 per atom; this run reaches 0.96.
    assert cos.mean() > 0.85 and (cos > 0.9).float().mean() > 0.7, cos.mean()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
@pytest.mark.parametrize("setting", ["", "system"])
def test_training_reuses_freed_big_blocks_without_page_faults(setting):
    """`saev train` asks malloc to keep freed memory (helpers.keep_freed_memory): once a few
    steps have run, a 64 MB block allocated again comes back without faulting its pages in from
    the kernel; SAEV_MALLOC=system leaves glibc's default (each big block mapped fresh: one
    fault per 4 KiB page, every time)."""
    script = (
        "import resource, torch\n"
        "from saev.helpers import keep_freed_memory\n"
        "print(keep_freed_memory())\n"
        "def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for step in range(16):\n"
        "    before = faults()\n"
        "    torch.empty(16 << 20).fill_(step)\n"  # 64 MB, freed at once
        "print(faults() - before)\n"
    )
    env = os.environ | {"SAEV_MALLOC": setting}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    pages = (64 << 20) // 4096
    if setting == "system":
        assert out[0] == "False" and int(out[1]) > pages // 2
    else:
        assert out[0] == "True" and int(out[1]) < pages // 20
