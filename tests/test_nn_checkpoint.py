"""Checkpoints: exact round trip for every family, saev 0.1 sae.pt files, refusing pickles."""

import io
import json

import pytest
import safetensors.torch
import torch

import saev
import saev.nn
from saev.errors import UserError

D, F = 8, 16


def trained(family, S=2):
    members = [{"seed": i} for i in range(S)]
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
    torch.testing.assert_close(sae(x), f @ state["W_dec"] + state["b_dec"])
    assert sae.family == "relu" and sae.d_sae == F and sae.cfg["hparams"]["seed"] == 3
    assert saev.nn.load(tmp_path).d_sae == F  # a directory holding only sae.pt


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
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "d_sae": 32}))
    with pytest.raises(
        UserError, match="tensor 'W_dec' has shape \\[16, 8\\], expected \\[32, 8\\]"
    ):
        saev.nn.load(tmp_path / "a")
    (tmp_path / "b.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a saev 0.1 checkpoint"):
        saev.nn.load(tmp_path / "b.pt")
    safetensors.torch.save_file({"x": torch.zeros(1)}, tmp_path / "a" / "sae.safetensors")
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="tensors do not match a topk SAE"):
        saev.nn.load(tmp_path / "a")


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
    assert (sae(xf) - xf).norm() / xf.norm() > 0.3

    saev.nn.calibrate_legacy(sae, xf)
    torch.testing.assert_close(sae(xf), xf, atol=1e-4, rtol=1e-4)
    m, s = normalised_01(x)
    assert sae.cfg["input_scale"] == pytest.approx(float(s), rel=1e-5)
    assert sae.cfg["input_normalisation"]["n_tokens"] == 512 and not sae.needs_calibration
    with pytest.raises(ValueError, match="only an uncalibrated saev 0.1 SAE"):
        saev.nn.calibrate_legacy(sae, xf)
    # Saved, it is an ordinary checkpoint that loads calibrated.
    saev.nn.save(sae, 0, tmp_path / "ck")
    again = saev.nn.load(tmp_path / "ck")
    assert not again.needs_calibration
    torch.testing.assert_close(again(xf), sae(xf))


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
