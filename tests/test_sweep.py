"""Sweep TOML: grid expansion, grouping into passes and stacks, the plan, and bad input."""

import pathlib

import pytest

from saev.errors import UserError
from saev.train import sweep
from saev.train.config import Config, DataConfig, SaeConfig


def grid(tmp_path, text: str, **kw) -> list[sweep.Member]:
    path = tmp_path / "grid.toml"
    path.write_text(text)
    return sweep.expand(Config(sweep=path, **kw))


def test_single_run_is_one_member():
    cfg = Config(data=DataConfig(shard_root=pathlib.Path("s")), sae=SaeConfig(k=16))
    (m,) = sweep.expand(cfg)
    assert m.cfg is cfg and m.axes == {}
    assert sweep.hparams(m.cfg)["k"] == 16


def test_cartesian_grid_and_mixed_family_grouping(tmp_path):
    members = grid(
        tmp_path,
        """
        lr = [1e-4, 3e-4]
        [data]
        shard_root = "shards"
        layer = [-2, -1]
        [sae]
        family = ["topk", "relu"]
        exp_factor = 4
        k = [16, 32]
        sparsity_coeff = 2.0
        """,
    )
    # topk: 2 lr x 2 layer x 2 k = 8; relu ignores k: 2 lr x 2 layer = 4.
    assert len(members) == 12
    assert len({m.name for m in members}) == 12
    relu = [m for m in members if m.cfg.sae.family == "relu"]
    assert all(m.cfg.sae.k is None and "sae.k" not in m.axes for m in relu)
    assert all(sweep.hparams(m.cfg)["sparsity_coeff"] == 2.0 for m in relu)
    topk = [m for m in members if m.cfg.sae.family == "topk"]
    assert all(m.cfg.sae.sparsity_coeff is None for m in topk)
    passes = sweep.group(members)
    # The layer decides the data read: 2 passes, each with a topk stack of 4 and a relu stack of 2.
    assert len(passes) == 2
    for p in passes:
        assert len({m.cfg.data.layer for m in p.members}) == 1
        sizes = {g.cfg.sae.family: len(g.members) for g in p.groups}
        assert sizes == {"topk": 4, "relu": 2}
        for g in p.groups:
            assert len({(m.cfg.sae.family, m.cfg.sae.exp_factor) for m in g.members}) == 1
    # The printed plan lists exactly the members that train, in their groups.
    text = sweep.plan_text(passes)
    assert "12 member(s) in 4 stacked group(s), 2 pass(es)" in text
    for m in members:
        assert m.name in text
    assert "differs in lr, sae.k" in text


def test_widths_and_structural_keys_split_stacks(tmp_path):
    members = grid(
        tmp_path,
        """
        [sae]
        family = "matryoshka"
        exp_factor = [2, 4]
        prefix_fracs = [[0.5, 1.0], [0.25, 1.0]]
        k = [8, 16]
        """,
    )
    (p,) = sweep.group(members)
    assert [len(g.members) for g in p.groups] == [2, 2, 2, 2]


def test_explicit_flags_override_the_toml(tmp_path):
    members = grid(
        tmp_path,
        "lr = [1e-4, 2e-4]\n[data]\nshard_root = 'a'\n[sae]\nk = [8, 16]\n",
        lr=5e-4,
        data=DataConfig(shard_root=pathlib.Path("b")),
    )
    assert len(members) == 2
    assert {m.cfg.lr for m in members} == {5e-4}
    assert {m.cfg.data.shard_root for m in members} == {pathlib.Path("b")}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[sae]\nkk = 3\n",
            r"grid.toml: unknown key 'sae.kk'; allowed keys at \[sae\]: family, exp_factor",
        ),
        ("lrr = 3\n", r"unknown key 'lrr'; allowed keys at the top level: sweep, lr,"),
        ("[model]\nx = 1\n", r"unknown table \[model\]; allowed tables: data, sae, wandb"),
        ("[sae]\nk = 'big'\n", r"key 'sae.k' has value 'big'; expected an integer"),
        ("[sae]\nk = [8, 1.5]\n", r"key 'sae.k' has value 1.5; expected an integer"),
        (
            "[data]\ntokens = 'cls_only'\n",
            r"key 'data.tokens' has value 'cls_only'; expected one of 'patches', 'cls', 'all'",
        ),
        ("lr = []\n", r"key 'lr' is an empty list; a grid axis needs values"),
        (
            "ckpt_every = [1, 2]\n",
            r"key 'ckpt_every' belongs to the whole run and cannot be a grid axis",
        ),
        (
            "[sae]\nfamily = 'relu'\nk = 3\n",
            r"key 'sae.k' does not apply to family relu; its hyperparameters are: dead_after_tokens, sparsity_coeff",
        ),
        (
            "[sae]\nfamily = 'tpk'\n",
            r"key 'sae.family' has value 'tpk'; expected one of 'relu', 'topk'",
        ),
        ("lr = 1e-3\nlr_x", r"grid.toml: not valid TOML"),
    ],
)
def test_bad_toml_is_one_clear_line(tmp_path, text, message):
    with pytest.raises(UserError, match=message) as err:
        grid(tmp_path, text)
    assert "\n" not in str(err.value)


def test_bad_hparam_value_names_it(tmp_path):
    (m,) = grid(tmp_path, "[sae]\nk = 0\n")
    with pytest.raises(UserError, match="k=0"):
        sweep.hparams(m.cfg)


def test_missing_sweep_file():
    with pytest.raises(UserError, match="--sweep nope.toml: no such file"):
        sweep.expand(Config(sweep=pathlib.Path("nope.toml")))


def test_families_match_saev_nn():
    import typing

    import saev.nn
    from saev.train.config import HPARAM_FIELDS, Family

    assert set(typing.get_args(Family)) == set(saev.nn.FAMILIES)
    used = {k for hp in saev.nn.HPARAMS.values() for k in hp} - {"seed"}
    assert used == set(HPARAM_FIELDS)


def test_sae_flags_come_from_the_hparam_specs():
    """Each `--sae.NAME` flag and `[sae] NAME` key is a saev.nn hyperparameter, typed and documented there."""
    import typing

    import saev.nn
    from saev.train.config import HPARAM_FIELDS, SaeConfig

    hints = typing.get_type_hints(SaeConfig, include_extras=True)
    for name in HPARAM_FIELDS:
        spec = saev.nn.HPARAM_SPECS[name]
        tp, arg = typing.get_args(hints[name])
        assert tp == spec.type | None and arg.help == spec.doc
        assert sweep.fields()[f"sae.{name}"] == spec.type | None
    assert SaeConfig().k is None and SaeConfig(k=3).k == 3


def test_example_configs_expand():
    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    paths = sorted(root.glob("*.toml"))
    assert len(paths) >= 3
    for path in paths:
        members = sweep.expand(Config(sweep=path, data=DataConfig(shard_root=pathlib.Path("s"))))
        assert members, path
        for m in members:
            sweep.hparams(m.cfg)


def test_a_jumprelu_lambda_sweep_stuck_at_one_l0_gets_a_hint(tmp_path):
    """`saev train` ends with a hint when λ spans 3x or more but L0 stays within 25%: the
    thresholds have not caught up (docs/train.md, "jumprelu"); not when λ sets L0."""
    from saev.train.main import stalled_thresholds

    members = grid(
        tmp_path,
        """
        [data]
        shard_root = "s"
        [sae]
        family = "jumprelu"
        sparsity_coeff = [0.0, 0.001, 0.01, 0.03]
        threshold_lr_scale = [1.0, 10.0]
        """,
    )
    by = {(m.axes["sae.sparsity_coeff"], m.axes["sae.threshold_lr_scale"]): m.name for m in members}
    l0 = {(0.001, 1.0): 125.0, (0.01, 1.0): 124.5, (0.03, 1.0): 135.0}
    l0 |= {(0.001, 10.0): 34.0, (0.01, 10.0): 6.3, (0.03, 10.0): 2.4}
    l0 |= {(0.0, 1.0): 400.0, (0.0, 10.0): 400.0}  # λ 0 sets no L0: not part of the check
    results = {by[key]: {"l0_mean": v} for key, v in l0.items()}
    (hint,) = stalled_thresholds(members, results)
    assert hint.startswith("note: jumprelu members with sparsity_coeff 0.001 to 0.03 ended at")
    assert "L0 124.5 to 135.0" in hint and "--sae.threshold-lr-scale" in hint
    # A run without eval scores gets none; nor does a target-L0 sweep (λ is not what sets L0).
    assert stalled_thresholds(members, {}) == []
    one = grid(
        tmp_path, '[data]\nshard_root = "s"\n[sae]\nfamily = "jumprelu"\ntarget_l0 = [8.0, 16.0]\n'
    )
    assert stalled_thresholds(one, {m.name: {"l0_mean": 40.0} for m in one}) == []
