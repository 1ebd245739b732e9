"""Each family's forward and losses against hand-written reference computations."""

import math
import pathlib
import re

import pytest
import torch
from factories import DEVICES

import saev.nn
from saev.errors import UserError

D, F, B = 6, 10, 5


def make(family, members, seed=0, device="cpu"):
    stack = saev.nn.make_stack(family, d_vit=D, d_sae=F, members=members).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        stack.scale.copy_(torch.tensor([0.5, 2.0, 1.0])[: stack.S])
        stack.b_dec.copy_(torch.randn(stack.b_dec.shape, generator=g, dtype=torch.float64))
        stack.b_enc.copy_(torch.randn(stack.b_enc.shape, generator=g, dtype=torch.float64) * 0.3)
        stack.W_enc.copy_(torch.randn(stack.W_enc.shape, generator=g, dtype=torch.float64))
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    return stack.to(device), x.to(device)


def ref_pre(stack, x, s):
    """Reference pre-activations for member s, with plain loops over tokens."""
    rows = []
    for b in range(x.shape[0]):
        xt = stack.scale[s] * x[b] - stack.b_dec[s]
        rows.append(
            torch.stack([(xt * stack.W_enc[s, :, f]).sum() + stack.b_enc[s, f] for f in range(F)])
        )
    return torch.stack(rows).detach()


def ref_recon(stack, x, f, s):
    xs = stack.scale[s] * x
    recon = f @ stack.W_dec[s].detach() + stack.b_dec[s].detach()
    return ((xs - recon) ** 2).sum(-1).mean(), recon / stack.scale[s]


def test_relu_forward_and_l1():
    stack, x = make("relu", [{"sparsity_coeff": 0.5}, {"sparsity_coeff": 2.0}])
    out = stack(x, warmup=0.5)
    for s, lam in enumerate([0.5, 2.0]):
        f = ref_pre(stack, x, s).clamp_min(0)
        recon, x_hat = ref_recon(stack, x, f, s)
        torch.testing.assert_close(out.f[s].detach(), f)
        torch.testing.assert_close(out.x_hat[s].detach(), x_hat)
        torch.testing.assert_close(out.losses["recon"][s].item(), recon.item())
        # L1 weighted by sqrt(d_vit): the loss over d_vit is MSE per coordinate + lam * L1 / sqrt(d).
        torch.testing.assert_close(
            out.losses["sparsity"][s].item(), 0.5 * lam * math.sqrt(D) * f.sum(-1).mean().item()
        )
    torch.testing.assert_close(out.losses["total"], out.losses["recon"] + out.losses["sparsity"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paths", ["ddd", "sss", "dsd", "sds", "ssd"])
def test_relu_step_on_any_mix_of_paths_equals_the_dense_step(paths, device, monkeypatch):
    """Each relu member takes the dense or the sparse path; any mix (members in order or not)
    gives the codes, losses, L0, fired latents and every gradient (input included) of the
    all-dense step."""
    from saev.nn import families

    def run(pattern):
        monkeypatch.setattr(
            families.ReLUStack, "_sparse_members", lambda self, pre: [c == "s" for c in pattern]
        )
        stack, x = make("relu", [{"sparsity_coeff": c} for c in (0.5, 2.0, 1.0)], device=device)
        with torch.no_grad():
            stack.b_enc.sub_(1.5)  # some tokens and latents inactive
            stack.b_enc[2, :4] = -50.0  # member 2: latents 0-3 never fire
        x.requires_grad_(True)
        out = stack(x, warmup=0.5)
        out.losses["total"].sum().backward()
        grads = {n: p.grad.clone() for n, p in stack.named_parameters()}
        return out, grads, x.grad.clone(), stack.tokens_since_fired.clone()

    out, grads, gx, since = run(paths)
    want, want_grads, want_gx, want_since = run("ddd")
    if paths in ("ddd", "sss"):
        assert not out.codes.parts and (out.codes.layout is not None) == (paths == "sss")
    else:
        by_path = {part.layout is not None: m for m, part in out.codes.parts}
        assert by_path[True] == tuple(i for i, c in enumerate(paths) if c == "s")
        assert by_path[False] == tuple(i for i, c in enumerate(paths) if c == "d")
    f = want.f.detach()
    assert 0 < (f > 0).sum() < f.numel() / 2
    torch.testing.assert_close(out.f.detach(), f)
    torch.testing.assert_close(out.x_hat.detach(), want.x_hat.detach())
    for key in want.losses:
        torch.testing.assert_close(out.losses[key], want.losses[key], msg=key)
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], msg=name)
    torch.testing.assert_close(gx, want_gx)
    torch.testing.assert_close(out.l0, want.l0)
    assert torch.equal(since, want_since) and since[2, :4].eq(B).all()


def test_relu_members_choose_their_path_by_their_own_density():
    stack, x = make("relu", [{}, {}])
    with torch.no_grad():
        stack.b_enc[0] = -100.0  # member 0 silent: sparse; member 1 all active: dense
        stack.b_enc[1] = 100.0
    out = stack(x)
    (dense_members, dense), (sparse_members, sparse) = out.codes.parts
    assert dense_members == (1,) and dense.dense is not None
    assert sparse_members == (0,) and sparse.layout is not None and sparse.vals.numel() == 0
    assert out.l0.tolist() == [0.0, F]
    out.losses["total"].sum().backward()  # member 0 has no active pair: only its b_dec learns
    assert stack.W_enc.grad[0].abs().sum() == 0 and stack.b_dec.grad[0].abs().sum() > 0
    assert stack.W_enc.grad[1].abs().sum() > 0
    with torch.no_grad():
        assert stack(x).codes.dense is not None  # no gradient wanted: plain dense inference


def test_topk_per_member_k():
    stack, x = make("topk", [{"k": 2}, {"k": 4}])
    out = stack(x)
    for s, k in enumerate([2, 4]):
        pre = ref_pre(stack, x, s)
        f = torch.zeros_like(pre)
        for b in range(B):
            order = sorted(range(F), key=lambda j: -pre[b, j].item())[:k]
            for j in order:
                f[b, j] = max(pre[b, j].item(), 0.0)
        torch.testing.assert_close(out.f[s].detach(), f)
        recon, x_hat = ref_recon(stack, x, f, s)
        torch.testing.assert_close(out.losses["recon"][s].item(), recon.item())
        torch.testing.assert_close(out.x_hat[s].detach(), x_hat)
        assert out.l0[s].item() == pytest.approx((f != 0).sum().item() / B)


def test_auxk_on_dead_latents():
    stack, x = make(
        "topk", [{"k": 2, "k_aux": 3, "aux_coeff": 0.25, "dead_after_tokens": 10}, {"k": 2}]
    )
    with torch.no_grad():
        stack.tokens_since_fired[0, :5] = 100  # member 0: latents 0..4 dead; member 1: none
    out = stack.train()(x)
    assert out.losses["aux"][1].item() == 0.0
    pre = ref_pre(stack, x, 0)
    xs = stack.scale[0] * x
    f = torch.zeros_like(pre)
    aux = torch.zeros_like(pre)
    for b in range(B):
        for j in sorted(range(F), key=lambda j: -pre[b, j].item())[:2]:
            f[b, j] = max(pre[b, j].item(), 0.0)
        for j in sorted(range(5), key=lambda j: -pre[b, j].item())[:3]:
            aux[b, j] = max(pre[b, j].item(), 0.0)
    W = stack.W_dec[0].detach()
    e = xs - (f @ W + stack.b_dec[0].detach())
    # Gao et al.: alpha * NMSE of the aux reconstruction of e, normalised by Var(e), next to a
    # main loss normalised by Var(x); our main loss is unnormalised, so the term is rescaled by
    # Var(x): alpha * (sum|x - mean x|^2 / sum|e - mean e|^2) * mean_b |e_b - e_hat_b|^2.
    var_x = ((xs - xs.mean(0)) ** 2).sum()
    var_e = ((e - e.mean(0)) ** 2).sum()
    want = 0.25 * var_x / var_e * ((e - aux @ W) ** 2).sum(-1).mean()
    torch.testing.assert_close(out.losses["aux"][0].item(), want.item())
    # It is the paper's weight: the aux term over the main term's own normalisation equals
    # alpha * NMSE(e, e_hat) exactly.
    nmse_aux = ((e - aux @ W) ** 2).sum() / var_e
    torch.testing.assert_close(
        (out.losses["aux"][0] / (var_x / B)).item(), (0.25 * nmse_aux).item()
    )
    # Counters: fired latents reset to 0, the others advanced by B tokens.
    fired = (out.f[0] != 0).any(0)
    assert (stack.tokens_since_fired[0][fired] == 0).all()
    assert (stack.tokens_since_fired[0][~fired][:1] >= B).all()


def test_auxk_on_each_path_gives_the_dense_expressions_loss_and_gradients():
    """Four members: more dead latents than 4·k_aux (sparse products over the selection),
    between k_aux and 4·k_aux (dense over the dead columns, masked to the selection), at most
    k_aux (dense, all of them), none. The aux loss and every parameter's gradient of it equal
    plain autograd of the expression, with the selection done by sorting each row."""
    f_, d, b = 64, 8, 32
    members = [{"k": 2, "k_aux": k_aux, "seed": i} for i, k_aux in enumerate([2, 4, 8, 4])]
    stack = saev.nn.make_stack("topk", d_vit=d, d_sae=f_, members=members).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, d, generator=g, dtype=torch.float64) * 2
    stack.init_from_data(x)
    dead = torch.zeros(4, f_, dtype=torch.bool)
    dead[0, :20] = True  # 20 > 4*2: sparse
    dead[1, 5:15] = True  # 4 < 10 <= 16: dense, masked
    dead[2, ::13] = True  # 5 <= 8: dense, every dead latent
    with torch.no_grad():
        stack.tokens_since_fired.copy_(dead * 10**9)
    params = [stack.W_enc, stack.b_enc, stack.W_dec, stack.b_dec]
    out = stack.train()(x)
    got = torch.autograd.grad(out.losses["aux"].sum(), params)

    xs = stack.scale[:, None, None] * x
    pre = (
        torch.einsum("sbd,sdf->sbf", xs - stack.b_dec[:, None], stack.W_enc) + stack.b_enc[:, None]
    )
    want_loss = []
    for s, k_aux in enumerate([2, 4, 8, 4]):
        masked = pre[s].detach().masked_fill(~dead[s], -math.inf)
        keep = torch.zeros(b, f_, dtype=torch.bool)
        for t in range(b):
            order = sorted(range(f_), key=lambda j: (-masked[t, j].item(), j))[:k_aux]
            keep[t, [j for j in order if dead[s, j]]] = True
        resid = (xs[s] - out.recon[s]).detach()
        hat = (torch.relu(pre[s]) * keep) @ stack.W_dec[s]
        var_x = ((xs[s] - xs[s].mean(0)) ** 2).sum()
        var_e = ((resid - resid.mean(0)) ** 2).sum()
        err = ((resid - hat) ** 2).sum(-1).mean()
        want_loss.append(0 if s == 3 else stack.members[s]["aux_coeff"] * var_x / var_e * err)
    want_loss = torch.stack([torch.as_tensor(w, dtype=torch.float64) for w in want_loss])
    torch.testing.assert_close(out.losses["aux"].detach(), want_loss.detach())
    want = torch.autograd.grad(want_loss.sum(), params)
    for name, a, w in zip(["W_enc", "b_enc", "W_dec", "b_dec"], got, want, strict=True):
        torch.testing.assert_close(a, w, msg=name)


def test_batchtopk_train_and_threshold_inference():
    stack, x = make(
        "batchtopk", [{"k": 2, "threshold_decay": 0.5}, {"k": 3, "threshold_decay": 0.5}]
    )
    stack.train()
    out = stack(x)
    for s, k in enumerate([2, 3]):
        pre = ref_pre(stack, x, s).clamp_min(0)
        flat = sorted(pre.flatten().tolist(), reverse=True)[: k * B]
        cut = flat[-1]
        want = pre * (pre >= cut)
        torch.testing.assert_close(out.f[s].detach(), want)
        # First update sets θ to the smallest kept positive activation.
        assert stack.threshold[s].item() == pytest.approx(min(v for v in flat if v > 0))
    theta0 = stack.threshold.clone()
    out2 = stack(x)  # same batch: same smallest value, EMA stays put
    torch.testing.assert_close(stack.threshold, theta0)
    stack.eval()
    f = stack.encode(x)
    for s in range(2):
        pre = ref_pre(stack, x, s)
        torch.testing.assert_close(f[s].detach(), pre.clamp_min(0) * (pre > theta0[s]))
    assert out2.losses["total"].shape == (2,)


def test_matryoshka_sums_prefix_losses():
    members = [{"k": 3, "base": "topk", "prefix_fracs": [0.3, 0.6, 1.0]}] * 2
    stack, x = make("matryoshka", members)
    out = stack(x)
    for s in range(2):
        f = out.f[s].detach()
        total = 0.0
        for n in (3, 6, 10):
            fm = f.clone()
            fm[:, n:] = 0
            total += ref_recon(stack, x, fm, s)[0].item()
        torch.testing.assert_close(out.losses["recon"][s].item(), total)


def test_matryoshka_members_must_share_prefixes():
    with pytest.raises(UserError, match="prefix_fracs"):
        saev.nn.make_stack(
            "matryoshka",
            d_vit=4,
            d_sae=8,
            members=[{"prefix_fracs": [0.5, 1.0]}, {"prefix_fracs": [0.25, 1.0]}],
        )


@pytest.mark.parametrize("target", [0.0, 3.0])
def test_jumprelu_forward_l0_and_threshold_gradient(target):
    eps = 0.5
    m = {"sparsity_coeff": 0.7, "bandwidth": eps, "threshold_init": 0.2, "target_l0": target}
    stack, x = make("jumprelu", [m, m])
    out = stack(x)
    theta = 0.2
    for s in range(2):
        pre = ref_pre(stack, x, s)
        f = pre * (pre > theta)
        torch.testing.assert_close(out.f[s].detach(), f)
        l0 = (pre > theta).double().sum(-1).mean().item()
        want = 0.7 * D * ((l0 / target - 1) ** 2 if target else l0)  # L0 weighted by d_vit
        torch.testing.assert_close(out.losses["sparsity"][s].item(), want)
    # ∂(Σ f)/∂θ = -(θ/ε) Σ rect((pre-θ)/ε); ∂L0/∂θ = -(1/ε) Σ rect(...)/B; chain through θ = exp(log θ).
    stack.log_threshold.grad = None
    out.f[0].sum().backward(retain_graph=True)
    pre = ref_pre(stack, x, 0)
    rect = ((pre - theta).abs() < eps / 2).double()
    torch.testing.assert_close(stack.log_threshold.grad[0], (-(theta / eps) * rect).sum(0) * theta)
    if not target:
        stack.log_threshold.grad = None
        out.losses["sparsity"][0].backward()
        torch.testing.assert_close(
            stack.log_threshold.grad[0], 0.7 * D * (-(1 / eps) * rect).sum(0) / B * theta
        )


def test_gated_forward_and_losses():
    stack, x = make("gated", [{"sparsity_coeff": 0.3}, {"sparsity_coeff": 1.5}])
    with torch.no_grad():
        stack.r_mag.copy_(torch.linspace(-0.5, 0.5, F).expand(2, F))
        stack.b_mag.fill_(0.1)
    out = stack(x)
    for s, lam in enumerate([0.3, 1.5]):
        gate = ref_pre(stack, x, s)  # π_gate = pre
        mag = (gate - stack.b_enc[s].detach()) * stack.r_mag[s].detach().exp() + 0.1
        f = (gate > 0) * mag.clamp_min(0)
        torch.testing.assert_close(out.f[s].detach(), f)
        recon, _ = ref_recon(stack, x, f, s)
        aux, _ = ref_recon(stack, x, gate.clamp_min(0), s)
        torch.testing.assert_close(out.losses["recon"][s].item(), recon.item())
        torch.testing.assert_close(out.losses["aux"][s].item(), aux.item())
        torch.testing.assert_close(
            out.losses["sparsity"][s].item(),
            lam * math.sqrt(D) * gate.clamp_min(0).sum(-1).mean().item(),
        )
    # The aux loss trains the gate path, never the decoder.
    stack.zero_grad()
    out.losses["aux"].sum().backward()
    assert stack.W_dec.grad is None or stack.W_dec.grad.abs().max() == 0
    assert stack.W_enc.grad.abs().max() > 0


def test_vsae_samples_only_in_training_and_kl():
    stack, x = make("vsae-iso", [{"kl_coeff": 2.0}, {"kl_coeff": 0.0}])
    with torch.no_grad():
        stack.W_logvar.normal_(0, 0.1)
        stack.b_logvar.fill_(-1.0)
    stack.eval()
    a, b = stack(x), stack(x)
    torch.testing.assert_close(a.f, b.f)
    for s in range(2):
        torch.testing.assert_close(a.f[s].detach(), ref_pre(stack, x, s).clamp_min(0))
    stack.train()
    c = stack(x, warmup=0.5)
    assert not torch.allclose(c.f, a.f)
    for s, beta in enumerate([2.0, 0.0]):
        mu = ref_pre(stack, x, s)
        xt = stack.scale[s] * x - stack.b_dec[s]
        lv = (xt @ stack.W_logvar[s] + stack.b_logvar[s]).detach().clamp(-8, 4)
        kl = (0.5 * (lv.exp() + mu**2 - 1 - lv)).mean(-1).mean()  # per latent: mean over F
        torch.testing.assert_close(c.losses["kl"][s].item(), 0.5 * beta * kl.item())
    assert c.losses["kl"][1].item() == 0.0


def test_vsae_logvar_clamped():
    stack, x = make("vsae-topk", [{"k": 3, "logvar_min": -2.0, "logvar_max": 1.0}] * 2)
    with torch.no_grad():
        stack.b_logvar.fill_(50.0)
    lv = stack._logvar(stack.scaled(x))
    assert lv.max().item() == 1.0


@pytest.mark.parametrize("family", ["vsae-topk", "vsae-gated", "vsae-jumprelu"])
def test_vsae_rules_use_mu_at_inference(family):
    k = {"k": 4} if family == "vsae-topk" else {}
    stack, x = make(family, [{"seed": 0, **k}, {"seed": 1, **k}])
    stack.eval()
    f = stack.encode(x)
    assert f.shape == (2, B, F)
    torch.testing.assert_close(f, stack.encode(x))
    if family == "vsae-topk":
        assert ((f != 0).sum(-1) <= 4).all()


def test_hparam_validation_messages():
    with pytest.raises(
        UserError, match="has no hyperparameter 'kk'; allowed: aux_coeff, dead_after_tokens, k,"
    ):
        saev.nn.check_hparams("topk", {"kk": 3})
    with pytest.raises(UserError, match="unknown SAE family 'topkk'"):
        saev.nn.make_stack("topkk", d_vit=4, d_sae=8, members=[{}])
    with pytest.raises(UserError, match="k=0"):
        saev.nn.check_hparams("topk", {"k": 0})
    assert saev.nn.check_hparams("relu", {})["sparsity_coeff"] == 0.1
    assert set(saev.nn.HPARAMS) == set(saev.nn.FAMILIES)
    assert math.isclose(saev.nn.HPARAMS["topk"]["aux_coeff"], 1 / 32)


def test_every_hparam_has_one_spec_and_its_defaults_fit_it():
    """`HPARAM_SPECS` is the one list of names and types; each family's defaults must agree."""
    used = {key for hp in saev.nn.HPARAMS.values() for key in hp}
    assert used == set(saev.nn.HPARAM_SPECS)
    for family, defaults in saev.nn.HPARAMS.items():
        for key, value in defaults.items():
            tp = saev.nn.HPARAM_SPECS[key].type
            want = (list, tuple) if tp == tuple[float, ...] else tp
            assert isinstance(value, want), (family, key, value)
            assert saev.nn.check_hparams(family, {})[key] == value


def _bracketed(text: str, start: int) -> str:
    """The text inside the brackets that open at text[start], nested brackets included."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"[": 1, "]": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1 : i]
    raise ValueError(f"unclosed bracket in {text!r}")


def test_the_families_table_in_the_docs_gives_the_code_defaults():
    """docs/families.md's table ("hyperparameters [default]") states each default that
    `saev.nn.HPARAMS` holds: a changed default must change the table too."""
    doc = (pathlib.Path(__file__).parents[1] / "docs" / "families.md").read_text()
    rows = [line for line in doc.splitlines() if re.match(r"\| `[a-z-]+` \|", line)]
    assert {re.match(r"\| `([a-z-]+)`", r).group(1) for r in rows} == set(saev.nn.FAMILIES)
    checked = 0
    for row in rows:
        family = re.match(r"\| `([a-z-]+)`", row).group(1)
        hparams = row.rstrip(" |").rsplit(" | ", 1)[1]
        for m in re.finditer(r"`(\w+)`[^`\[]*\[", hparams):
            text = _bracketed(hparams, m.end() - 1)
            value = eval(text.replace("true", "True").replace("false", "False"), {})  # noqa: S307
            want = saev.nn.HPARAMS[family][m.group(1)]
            if isinstance(want, (list, tuple)):
                value, want = list(value), list(want)
            assert value == pytest.approx(want), (family, m.group(1), value, want)
            checked += 1
    assert checked >= 20


@pytest.mark.parametrize("family", saev.nn.FAMILIES)
def test_encode_gradient_wrt_input_matches_finite_differences(family):
    """Splicing an SAE into a ViT needs d codes / d input; the sparse top-k path used to drop it."""
    member = {"k": 3} if "k" in saev.nn.HPARAMS[family] else {}
    stack, _ = make(family, [member])
    if family == "jumprelu" or family == "vsae-jumprelu":
        with torch.no_grad():
            stack.log_threshold.fill_(math.log(0.05))
    sae = saev.nn.SAE(stack, extra={})
    x = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x.requires_grad_(True)
    assert sae.encode(x).abs().sum() > 0
    assert torch.autograd.gradcheck(sae.encode, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("n_dead", [3, 12, 40])  # all dead latents; dense, masked; sparse
def test_auxk_under_bfloat16_autocast_gives_float32_gradients(n_dead):
    stack = saev.nn.make_stack("topk", d_vit=8, d_sae=64, members=[{"k": 2, "k_aux": 4}])
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(5))
    stack.init_from_data(x)
    with torch.no_grad():
        stack.tokens_since_fired[0, :n_dead] = 10**9
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stack.train()(x)
    aux = out.losses["aux"]
    assert aux.dtype == torch.float32 and torch.isfinite(aux).all() and aux.item() > 0
    grads = torch.autograd.grad(aux.sum(), [stack.W_enc, stack.b_enc, stack.W_dec, stack.b_dec])
    for p, g in zip([stack.W_enc, stack.b_enc, stack.W_dec, stack.b_dec], grads, strict=True):
        assert g.dtype == torch.float32 and g.shape == p.shape and torch.isfinite(g).all()
    # Only dead latents' encoder columns and decoder rows learn from AuxK.
    assert grads[0][0, :, n_dead:].abs().max() == 0 and grads[0][0, :, :n_dead].abs().max() > 0
    assert grads[2][0, n_dead:].abs().max() == 0
