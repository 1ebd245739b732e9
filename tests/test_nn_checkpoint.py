"""Checkpoints: exact round trip for every family, saev 0.1 sae.pt files, refusing pickles."""

import io
import json
import math

import pytest
import safetensors.torch
import torch

import saev
import saev.nn
from saev.errors import UserError

D, F = 8, 16


def trained(family, S=2):
    k = {"k": 4} if "k" in saev.nn.HPARAMS[family] else {}  # k <= d_sae
    members = [{"seed": i, **k} for i in range(S)]
    stack = saev.nn.make_stack(family, d_vit=D, d_sae=F, members=members)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, D, generator=g) * 3
    stack.init_from_data(x)
    opt = saev.nn.StackAdam(stack, lr=1e-2)
    for _ in range(2):
        out = stack(x)
        opt.zero_grad()
        out.losses["total"].sum().backward()
        opt.step()
    return stack, x


@pytest.mark.parametrize("family", saev.nn.FAMILIES)
def test_round_trip_every_family(family, tmp_path):
    stack, x = trained(family)
    extra = {"layer": 11, "tokens": "patches", "shards": {"d_vit": D}, "shard_root": "/x"}
    saev.nn.save(stack, 1, tmp_path / "ck", extra)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "sae.safetensors"]
    sae = saev.nn.load(tmp_path / "ck")
    assert (sae.family, sae.d_vit, sae.d_sae, sae.layer, sae.tokens) == (
        family,
        D,
        F,
        11,
        "patches",
    )
    assert sae.cfg["hparams"] == stack.members[1]
    assert sae.cfg["saev_version"] == saev.__version__ and sae.cfg["shards"] == {"d_vit": D}
    assert sae.cfg["input_scale"] == float(stack.scale[1])
    member = stack.member(1)
    for (k, a), b in zip(
        member.stack.state_dict().items(), sae.stack.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k
    stack.eval()
    f = stack.encode(x)[1]
    assert torch.equal(sae.encode(x), f)
    assert torch.equal(sae.decode(f), stack.decode(stack.encode(x))[1])
    assert torch.equal(sae(x), sae.decode(sae.encode(x)))
    assert sae.encode(x[None]).shape == (1, 64, F)  # any leading shape
    # Loading the config.json or weights path works too.
    assert torch.equal(saev.nn.load(tmp_path / "ck" / "config.json").encode(x), f)


def test_batchtopk_threshold_saved_and_used(tmp_path):
    stack, x = trained("batchtopk")
    assert (stack.threshold > 0).all()
    saev.nn.save(stack, 0, tmp_path, {})
    sae = saev.nn.load(tmp_path)
    assert sae.stack.threshold.item() == stack.threshold[0].item()
    pre = sae.stack.pre_acts(sae.stack.scaled(x))[0]
    torch.testing.assert_close(sae.encode(x), pre.relu() * (pre > stack.threshold[0]))


def legacy_file(path, state, header=None):
    header = header or {
        "schema": 1,
        "cfg": {"d_vit": D, "exp_factor": 2, "seed": 3, "sparsity_coeff": 4e-4},
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    path.write_bytes((json.dumps(header) + "\n").encode() + buf.getvalue())
    return path


def test_load_saev_01_sae_pt(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {
        "W_enc": torch.randn(D, F, generator=g),
        "b_enc": torch.randn(F, generator=g),
        "W_dec": torch.randn(F, D, generator=g),
        "b_dec": torch.randn(D, generator=g),
    }
    sae = saev.nn.load(legacy_file(tmp_path / "sae.pt", state))
    x = torch.randn(5, D, generator=g)
    f = torch.relu((x - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae(x)[0], f @ state["W_dec"] + state["b_dec"])
    assert sae.family == "relu" and sae.d_sae == F and sae.cfg["hparams"]["seed"] == 3
    assert saev.nn.load(tmp_path).d_sae == F  # a directory holding only sae.pt


def legacy_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D, F, generator=g),
        "b_enc": torch.randn(F, generator=g),
        "W_dec": torch.randn(F, D, generator=g),
        "b_dec": torch.randn(D, generator=g),
    }


HEADER = {"schema": 1, "cfg": {"d_vit": D, "exp_factor": 2, "seed": 3, "sparsity_coeff": 4e-4}}


@pytest.mark.parametrize(
    "state, header, fragment",
    [
        ({"W_enc": torch.zeros(D)}, None, "tensor 'W_enc' has shape [8]; expected [d_vit, d_sae]"),
        ({"b_enc": torch.zeros(3)}, None, "'b_enc' has shape [3], inconsistent with W_enc [8, 16]"),
        ({"W_dec": torch.zeros(F, D).int()}, None, "'W_dec' has dtype int32; expected a float"),
        ({"b_dec": torch.full((D,), math.inf)}, None, "'b_dec' has 8 non-finite value(s)"),
        ({}, {"cfg": {"d_vit": 9}}, "the header says d_vit=9 but tensor 'W_enc' has shape [8, 16]"),
        ({}, {"cfg": {"sparsity_coeff": -1}}, "relu hyperparameter sparsity_coeff=-1.0: expected"),
    ],
)
def test_bad_saev_01_file_is_one_line_naming_it(state, header, fragment, tmp_path):
    path = legacy_file(tmp_path / "sae.pt", {**legacy_state(), **state}, header)
    before = path.read_bytes()
    with pytest.raises(UserError) as info:
        saev.nn.load(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and fragment in msg and "\n" not in msg, msg
    assert path.read_bytes() == before


def test_saev_01_header_without_cfg_object_still_loads(tmp_path):
    sae = saev.nn.load(legacy_file(tmp_path / "sae.pt", legacy_state(), {"cfg": [1, 2]}))
    assert (sae.family, sae.d_vit, sae.d_sae) == ("relu", D, F)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_refuses_pickled_objects(tmp_path, capsys):
    state = {
        "W_enc": torch.zeros(D, F),
        "b_enc": torch.zeros(F),
        "W_dec": torch.zeros(F, D),
        "b_dec": Evil(),
    }
    path = tmp_path / "sae.pt"
    buf = io.BytesIO()
    torch.save(state, buf)
    path.write_bytes(b'{"d_vit": 8}\n' + buf.getvalue())
    with pytest.raises(
        UserError, match="sae.pt: refused to load: the file needs arbitrary Python objects"
    ):
        saev.nn.load(path)
    assert "pwned" not in capsys.readouterr().out


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="config.json: missing"):
        saev.nn.load(tmp_path)
    stack, _ = trained("topk", S=1)
    saev.nn.save(stack, 0, tmp_path / "a", {})
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "schema": 99}))
    with pytest.raises(UserError, match="schema 99 is not supported"):
        saev.nn.load(tmp_path / "a")
    (tmp_path / "b.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a saev 0.1 checkpoint"):
        saev.nn.load(tmp_path / "b.pt")


# ---- config.json and sae.safetensors are validated before any tensor is built (issue 12.8) ----


def saved(tmp_path, family="topk"):
    """A saved checkpoint directory, its config dict and a snapshot of its files' bytes."""
    stack, _ = trained(family, S=1)
    extra = {"layer": 11, "tokens": "patches", "shards": {"d_vit": D}, "shard_root": "/x"}
    ckpt = saev.nn.save(stack, 0, tmp_path / "ck", extra)
    cfg = json.loads((ckpt / "config.json").read_text())
    return ckpt, cfg


def snapshot(ckpt):
    return {p.name: p.read_bytes() for p in sorted(ckpt.iterdir())}


def assert_one_line_error(ckpt, fragment, culprit="config.json"):
    """load raises a one-line UserError that starts with the file at fault, names `fragment`,
    and leaves the checkpoint directory byte-identical."""
    before = snapshot(ckpt)
    with pytest.raises(UserError) as info:
        saev.nn.load(ckpt)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{ckpt / culprit}: "), msg
    assert fragment in msg, msg
    assert snapshot(ckpt) == before
    return msg


def _drop(key):
    return lambda cfg: {k: v for k, v in cfg.items() if k != key}


def _set(key, value):
    return lambda cfg: {**cfg, key: value}


def _hp(**kw):
    return lambda cfg: {**cfg, "hparams": {**cfg["hparams"], **kw}}


BAD_CONFIGS = {
    "d_vit string": (_set("d_vit", "192"), "d_vit='192': expected a positive integer"),
    "d_vit zero": (_set("d_vit", 0), "d_vit=0: expected a positive integer"),
    "d_vit float": (_set("d_vit", 8.0), "d_vit=8.0: expected a positive integer"),
    "d_vit bool": (_set("d_vit", True), "d_vit=True: expected a positive integer"),
    "d_sae negative": (_set("d_sae", -16), "d_sae=-16: expected a positive integer"),
    "d_sae null": (_set("d_sae", None), "d_sae=None: expected a positive integer"),
    "family unknown": (_set("family", "topkk"), "unknown SAE family 'topkk'; expected one of"),
    "family number": (_set("family", 3), "unknown SAE family 3"),
    "family missing": (_drop("family"), "missing key 'family'"),
    "schema string": (_set("schema", "1"), "schema '1' is not supported; expected 1"),
    "schema missing": (_drop("schema"), "missing key 'schema'"),
    "hparams list": (_set("hparams", [32]), "hparams=[32]: expected an object"),
    "k negative": (_hp(k=-3), "topk hyperparameter k=-3: expected an integer >= 1"),
    "k string": (_hp(k="32"), "topk hyperparameter k='32': expected an integer >= 1"),
    "k missing": (lambda c: {**c, "hparams": {"seed": 0}}, "hparams has no 'k'"),
    "hparam unknown": (_hp(kk=3), "has no hyperparameter 'kk'; allowed:"),
    "aux_coeff nan": (_hp(aux_coeff=math.nan), "aux_coeff=nan: expected a finite number"),
    "input_scale string": (_set("input_scale", "1.0"), "input_scale='1.0': expected a finite"),
    "input_scale zero": (_set("input_scale", 0.0), "input_scale=0.0: expected a finite number > 0"),
    "input_scale inf": (_set("input_scale", math.inf), "input_scale=inf"),
    "input_scale missing": (_drop("input_scale"), "missing key 'input_scale'"),
    "layer string": (_set("layer", "11"), "layer='11': expected an integer block index"),
    "tokens unknown": (_set("tokens", "patch"), "tokens='patch': expected one of patches, cls"),
    "shard_root number": (_set("shard_root", 5), "shard_root=5: expected a directory path"),
    "shards list": (_set("shards", []), "shards=[]: expected an object or null"),
    "split frac": (_set("split", {"eval_frac": 2}), "split.eval_frac=2: expected a number"),
    "saev_version number": (_set("saev_version", 2), "saev_version=2: expected a version"),
    "normalisation": (_set("input_normalisation", 3), "input_normalisation=3: expected"),
    "not an object": (lambda c: [c], "expected a JSON object; got list"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_json_is_one_line_naming_the_file(case, tmp_path):
    edit, fragment = BAD_CONFIGS[case]
    ckpt, cfg = saved(tmp_path)
    (ckpt / "config.json").write_text(json.dumps(edit(cfg)))
    assert_one_line_error(ckpt, fragment)


@pytest.mark.parametrize(
    "text, fragment",
    [("{", "not a readable JSON file (Expecting property name"), (b"\xff\xfe{", "not a readable")],
)
def test_unreadable_config_json(text, fragment, tmp_path):
    ckpt, _ = saved(tmp_path)
    path = ckpt / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert_one_line_error(ckpt, fragment)


def _weights(ckpt):
    return safetensors.torch.load_file(ckpt / "sae.safetensors")


def test_sizes_of_config_and_weights_must_agree(tmp_path):
    ckpt, cfg = saved(tmp_path)
    (ckpt / "config.json").write_text(json.dumps({**cfg, "d_sae": 32}))
    msg = assert_one_line_error(ckpt, "tensor 'W_enc' has shape [8, 16]", "sae.safetensors")
    assert f"but {ckpt / 'config.json'} (d_vit=8, d_sae=32) needs [8, 32]." in msg
    # A config asking for a huge SAE fails on the file's header, before allocating anything.
    (ckpt / "config.json").write_text(json.dumps({**cfg, "d_vit": 10**6, "d_sae": 10**7}))
    assert_one_line_error(ckpt, "needs [1000000, 10000000]", "sae.safetensors")


def test_family_tensors_must_match_config(tmp_path):
    ckpt, cfg = saved(tmp_path, "vsae-mixture")
    hp = {**cfg["hparams"], "n_components": 3}
    (ckpt / "config.json").write_text(json.dumps({**cfg, "hparams": hp}))
    msg = assert_one_line_error(ckpt, "tensor 'prior_mean' has shape [16, 2]", "sae.safetensors")
    assert "(vsae-mixture, d_vit=8, d_sae=16) needs [16, 3]" in msg
    (ckpt / "config.json").write_text(json.dumps({**cfg, "family": "vsae-iso"}))
    assert_one_line_error(ckpt, "has no hyperparameter 'learn_prior'")
    (ckpt / "config.json").write_text(json.dumps({**cfg, "family": "relu", "hparams": {}}))
    assert_one_line_error(ckpt, "tensors do not match the relu SAE of", "sae.safetensors").endswith(
        "unexpected ['W_logvar', 'b_logvar', 'noise_step', 'prior_logit', 'prior_logvar', 'prior_mean'])."
    )


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda t: {k: v for k, v in t.items() if k != "W_dec"}, "no tensor 'W_dec'"),
        (lambda t: {k: v for k, v in t.items() if k != "b_enc"}, "(missing ['b_enc'], unexpected"),
        (lambda t: {**t, "extra": torch.zeros(2)}, "missing [], unexpected ['extra']"),
        (lambda t: {**t, "W_enc": t["W_enc"].long()}, "'W_enc' has dtype int64; expected a float"),
        (
            lambda t: {**t, "frozen": t["frozen"].float()},
            "'frozen' has dtype float32; expected a bool",
        ),
        (lambda t: {**t, "b_dec": t["b_dec"] * math.nan}, "'b_dec' has 8 non-finite value(s)"),
        (lambda t: {**t, "scale": t["scale"] * 2}, "but {cfg} has input_scale="),
    ],
)
def test_bad_weights_are_one_line_naming_the_file(edit, fragment, tmp_path):
    ckpt, _ = saved(tmp_path)
    safetensors.torch.save_file(edit(_weights(ckpt)), ckpt / "sae.safetensors")
    assert_one_line_error(ckpt, fragment.format(cfg=ckpt / "config.json"), "sae.safetensors")


def test_unreadable_weights_and_paths(tmp_path):
    ckpt, _ = saved(tmp_path)
    (ckpt / "sae.safetensors").write_bytes(b"\x00garbage")
    assert_one_line_error(ckpt, "not a readable safetensors file (", "sae.safetensors")
    with pytest.raises(UserError, match="nope: no such file or directory; expected an SAE"):
        saev.nn.load(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="notes.txt: not a checkpoint file"):
        saev.nn.load(tmp_path / "notes.txt")


def test_cli_reports_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    from saev.__main__ import run

    ckpt, cfg = saved(tmp_path)
    (ckpt / "config.json").write_text(json.dumps({**cfg, "d_vit": "192"}))
    before = snapshot(ckpt)
    out = tmp_path / "evaluation"
    assert run(["evaluate", "--ckpt", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {ckpt / 'config.json'}: d_vit='192': expected a positive integer.\n"
    assert snapshot(ckpt) == before and not out.exists()


def test_older_configs_fill_training_only_hparams(tmp_path):
    """A hyperparameter that only shapes training may be missing (an older saev wrote the file);
    it takes today's default. One the inference rule reads may not (see BAD_CONFIGS k missing)."""
    ckpt, cfg = saved(tmp_path)
    (ckpt / "config.json").write_text(json.dumps({**cfg, "hparams": {"k": 4}}))
    sae = saev.nn.load(ckpt)
    assert sae.cfg["hparams"] == saev.nn.check_hparams("topk", {"k": 4})


def test_old_vsae_mixture_loads_as_vsae_iso(tmp_path, caplog):
    """saev 0.2.0's vsae-mixture (correlated-pair prior, `prior_corr`) had vsae-iso's tensors and
    inference rule; it loads as vsae-iso with a warning, and re-saves as an ordinary vsae-iso."""
    stack, x = trained("vsae-iso", S=1)
    ckpt = saev.nn.save(stack, 0, tmp_path / "old", {"layer": 3})
    cfg = json.loads((ckpt / "config.json").read_text())
    old_hp = {k: v for k, v in cfg["hparams"].items() if k != "sparsity_coeff"}
    old = {**cfg, "family": "vsae-mixture", "hparams": {**old_hp, "prior_corr": 0.3}}
    (ckpt / "config.json").write_text(json.dumps(old))
    with caplog.at_level("WARNING", logger="saev.nn"):
        sae = saev.nn.load(ckpt)
    assert "old correlated-pair prior (prior_corr=0.3); it loads as vsae-iso" in caplog.text
    assert sae.family == "vsae-iso" and sae.layer == 3
    assert sae.cfg["migrated_from"] == {"family": "vsae-mixture", "prior_corr": 0.3}
    assert sae.cfg["hparams"]["sparsity_coeff"] == 0.0  # it was trained without an L1
    with torch.no_grad():
        xs = stack.scale[0] * x - stack.b_dec[0]
        mu = xs @ stack.W_enc[0] + stack.b_enc[0]
    torch.testing.assert_close(sae.encode(x), mu.relu())
    caplog.clear()
    again = saev.nn.load(saev.nn.save(sae, 0, tmp_path / "new"))
    assert caplog.text == "" and again.family == "vsae-iso"
    assert torch.equal(again.encode(x), sae.encode(x))


def subspace_data(n=512, seed=0):
    """Raw activations x = m + c * (z Q): centred data in a 3-dim subspace (rows of Q),
    shifted by a mean m that lies outside it and scaled by c."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(D, 3, generator=g, dtype=torch.float64))[0].T  # [3, D]
    z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    m = 5.0 + torch.randn(D, generator=g, dtype=torch.float64)
    return m + 7.0 * (z @ Q), Q


def normalised_01(x):
    """saev 0.1's input normalisation, by hand: x' = (x - m) / c, mean ||x'|| = sqrt(d)."""
    m = x.mean(0)
    c = (x - m).norm(dim=-1).mean() / D**0.5
    return m, 1 / c


def test_saev_01_sae_is_calibrated_from_raw_activations(tmp_path, caplog):
    # A 0.1 ReLU SAE "trained" on normalised data from the subspace: latents +-q for each
    # direction q, so it reconstructs any normalised input of the subspace exactly.
    x, Q = subspace_data()
    W_dec = torch.cat([Q, -Q]).float()  # [6, D], unit rows
    state = {"W_enc": W_dec.T.contiguous(), "b_enc": torch.zeros(6), "W_dec": W_dec}
    state["b_dec"] = torch.zeros(D)
    with caplog.at_level("WARNING", logger="saev.nn"):
        sae = saev.nn.load(legacy_file(tmp_path / "sae.pt", state))
    assert "saev 0.1 checkpoint" in caplog.text and "calibrate_legacy" in caplog.text
    assert sae.needs_calibration
    assert sae.cfg["input_normalisation"] == "unknown (saev 0.1: re-estimate from shards)"
    xf = x.float()
    # Raw activations straight in: the mean outside the subspace is lost.
    assert (sae(xf)[0] - xf).norm() / xf.norm() > 0.3

    saev.nn.calibrate_legacy(sae, xf)
    torch.testing.assert_close(sae(xf)[0], xf, atol=1e-4, rtol=1e-4)
    m, s = normalised_01(x)
    assert sae.cfg["input_scale"] == pytest.approx(float(s), rel=1e-5)
    assert sae.cfg["input_normalisation"]["n_tokens"] == 512 and not sae.needs_calibration
    with pytest.raises(ValueError, match="only an uncalibrated saev 0.1 SAE"):
        saev.nn.calibrate_legacy(sae, xf)
    # Saved, it is an ordinary checkpoint that loads calibrated.
    saev.nn.save(sae, 0, tmp_path / "ck")
    again = saev.nn.load(tmp_path / "ck")
    assert not again.needs_calibration
    torch.testing.assert_close(again(xf), sae(xf)[0])


def test_calibration_folds_the_01_normalisation_exactly(tmp_path):
    g = torch.Generator().manual_seed(1)
    state = {
        "W_enc": torch.randn(D, F, generator=g),
        "b_enc": torch.randn(F, generator=g),
        "W_dec": torch.randn(F, D, generator=g),
        "b_dec": torch.randn(D, generator=g),
    }
    x = 4.0 + 3.0 * torch.randn(300, D, generator=g, dtype=torch.float64)
    sae = saev.nn.calibrate_legacy(saev.nn.load(legacy_file(tmp_path / "sae.pt", state)), x)
    m, s = normalised_01(x)
    xn = ((x - m) * s).float()  # what 0.1's data loader fed its SAE
    f = torch.relu((xn - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
    torch.testing.assert_close(sae.encode(x.float()), f, atol=1e-4, rtol=1e-4)
    x_hat = ((f @ state["W_dec"] + state["b_dec"]).double() / s + m).float()
    torch.testing.assert_close(sae.decode(f), x_hat, atol=1e-4, rtol=1e-4)


def test_calibration_needs_a_real_sample(tmp_path):
    state = {"W_enc": torch.zeros(D, F), "b_enc": torch.zeros(F), "W_dec": torch.zeros(F, D)}
    sae = saev.nn.load(legacy_file(tmp_path / "sae.pt", {**state, "b_dec": torch.zeros(D)}))
    with pytest.raises(UserError, match="needs at least 2 activations of d_vit=8; got \\[1, 8\\]"):
        saev.nn.calibrate_legacy(sae, torch.ones(1, D))
    with pytest.raises(UserError, match="mean centred norm 0.0"):
        saev.nn.calibrate_legacy(sae, torch.ones(5, D))
    stack, _ = trained("relu", S=1)
    with pytest.raises(ValueError, match="input_normalisation is None"):
        saev.nn.calibrate_legacy(stack.member(0), torch.randn(5, D))
