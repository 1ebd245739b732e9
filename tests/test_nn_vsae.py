"""Variational families (issue 12.14): vsae-mixture's Gaussian-mixture prior and its KL bound,
and the L1 that makes vsae-iso and vsae-mixture sparse."""

import math

import pytest
import torch
from torch.distributions import Normal

import saev.nn
from saev.errors import UserError
from saev.nn.vsae import mixture_kl_bound

D, F, B = 6, 24, 16


def data(n=B, seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 1


def make(family, members, d_vit=D, d_sae=F):
    stack = saev.nn.make_stack(family, d_vit=d_vit, d_sae=d_sae, members=members).double()
    stack.init_from_data(data(256, seed=1, d=d_vit))
    with torch.no_grad():  # a posterior that is not the all-zero-logvar init
        stack.W_logvar.normal_(0, 0.2, generator=torch.Generator().manual_seed(2))
    return stack


def set_prior(stack, mean, logvar, logit):
    with torch.no_grad():
        for p, v in ((stack.prior_mean, mean), (stack.prior_logvar, logvar)):
            p.copy_(torch.as_tensor(v, dtype=p.dtype).expand_as(p))
        stack.prior_logit.copy_(torch.as_tensor(logit, dtype=stack.prior_logit.dtype))


def bound_by_hand(mu, var, means, variances, weights):
    """-log sum_k w_k exp(-KL(N(mu, var) || N(m_k, s_k^2))), one latent, plain floats."""
    kls = [
        0.5 * (math.log(s2 / var) + (var + (mu - m) ** 2) / s2 - 1)
        for m, s2 in zip(means, variances, strict=True)
    ]
    return -math.log(sum(w * math.exp(-kl) for w, kl in zip(weights, kls, strict=True)))


def numeric_kl(mu, var, means, variances, weights):
    """KL(N(mu, var) || mixture) by quadrature on a fine grid."""
    sd = math.sqrt(var)
    z = torch.linspace(mu - 14 * sd, mu + 14 * sd, 400_001, dtype=torch.float64)
    log_q = Normal(mu, sd).log_prob(z)
    comps = Normal(torch.tensor(means), torch.tensor(variances).sqrt()).log_prob(z[:, None])
    log_p = torch.logsumexp(comps + torch.tensor(weights).log(), -1)
    return float(torch.trapezoid(log_q.exp() * (log_q - log_p), z))


def test_mixture_kl_is_the_hershey_olsen_bound_by_hand():
    stack = make("vsae-mixture", [{"n_components": 3}], d_sae=2)
    means = [[-1.0, 0.0, 2.0], [0.5, 1.5, 3.0]]
    logvars = [[0.0, -1.0, 9.0], [-2.0, 0.3, 1.0]]  # 9 is clamped to logvar_max = 4
    logits = [[0.0, 1.0, -1.0], [2.0, 0.0, 0.5]]
    set_prior(stack, [means], [logvars], [logits])
    mu = torch.tensor([[[0.3, -0.7], [1.9, 2.5]]], dtype=torch.float64)  # [S=1, B=2, F=2]
    lv = torch.tensor([[[-0.5, 0.2], [-3.0, 1.0]]], dtype=torch.float64)
    got = stack._kl(mu, lv)
    want = 0.0
    for b in range(2):
        for i in range(2):
            w = [math.exp(v) for v in logits[i]]
            w = [v / sum(w) for v in w]
            s2 = [math.exp(min(v, 4.0)) for v in logvars[i]]
            want += bound_by_hand(mu[0, b, i].item(), math.exp(lv[0, b, i]), means[i], s2, w)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(want / 4, rel=1e-12)


@pytest.mark.parametrize(
    "mu, var, means, variances, weights, tight",
    [
        (5.0, 0.25, [-5.0, 5.0], [1.0, 1.0], [0.5, 0.5], True),  # q on one separated component
        (0.0, 9.0, [-1.0, 1.0], [1.0, 1.0], [0.5, 0.5], False),  # broad q over both
        (0.4, 0.5, [0.0, 2.0, 4.0], [0.1, 1.0, 4.0], [0.6, 0.3, 0.1], False),
    ],
)
def test_bound_is_above_the_true_kl_and_tight_when_separated(
    mu, var, means, variances, weights, tight
):
    K = len(means)
    stack = make("vsae-mixture", [{"n_components": K}], d_sae=1)
    set_prior(
        stack, [[means]], [[[math.log(v) for v in variances]]], [[[math.log(w) for w in weights]]]
    )
    t = torch.tensor([[[mu]]], dtype=torch.float64)
    bound = stack._kl(t, torch.full_like(t, math.log(var))).item()
    true = numeric_kl(mu, var, means, variances, weights)
    assert bound == pytest.approx(bound_by_hand(mu, var, means, variances, weights), rel=1e-12)
    assert bound >= true - 1e-7  # quadrature error ~1e-8
    if tight:
        assert bound == pytest.approx(true, abs=1e-6)
    else:
        assert bound > true + 1e-3
    # A single-sample Monte-Carlo estimate log q(z) - log p(z) is unbiased for the true KL.
    z = mu + math.sqrt(var) * torch.randn(400_000, generator=torch.Generator().manual_seed(0))
    z = z.double()
    comps = Normal(torch.tensor(means), torch.tensor(variances).sqrt()).log_prob(z[:, None])
    est = Normal(mu, math.sqrt(var)).log_prob(z) - torch.logsumexp(
        comps + torch.tensor(weights).log(), -1
    )
    assert abs(est.mean().item() - true) < 4 * est.std().item() / math.sqrt(len(z)) + 1e-9


def test_one_component_is_the_closed_form_gaussian_kl():
    """K = 1: the bound is exact; with the N(0, 1) prior fixed, vsae-mixture is vsae-iso."""
    members = [{"seed": 1, "kl_coeff": 2.0, "sparsity_coeff": 0.5}, {"seed": 2}]
    iso = make("vsae-iso", members)
    mix = make("vsae-mixture", [{**m, "n_components": 1, "learn_prior": False} for m in members])
    x = data(seed=3)
    for stack in (iso, mix):
        stack.train()
    a, b = iso(x, warmup=0.7), mix(x, warmup=0.7)
    for key in ("recon", "sparsity", "kl", "total"):
        torch.testing.assert_close(a.losses[key], b.losses[key], rtol=1e-12, atol=0)
    torch.testing.assert_close(a.x_hat, b.x_hat)

    # Any K = 1 prior N(0, s^2): the closed form, and the Monte-Carlo estimate in expectation.
    wide = make("vsae-mixture", [{"n_components": 1, "prior_std": 2.0}])
    xs = wide.scaled(x)
    mu, lv = wide.pre_acts(xs).detach(), wide._logvar(xs).detach()
    sd = (0.5 * wide.prior_logvar[0, 0, 0]).exp().detach()  # 2, up to float32 at init
    assert sd.item() == pytest.approx(2.0, rel=1e-6)
    q, p = Normal(mu, (0.5 * lv).exp()), Normal(0.0, sd)
    closed = torch.distributions.kl_divergence(q, p).mean()
    assert wide._kl(mu, lv).item() == pytest.approx(closed.item(), rel=1e-12)
    z = q.sample((2_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean((0, 2, 3))
    assert mc.item() == pytest.approx(closed.item(), rel=0.01)


def test_gradients_reach_heads_and_learned_priors_only():
    stack = make("vsae-mixture", [{"seed": 0}, {"seed": 1, "learn_prior": False}])
    stack.train()
    out = stack(data(seed=4))
    out.losses["total"].sum().backward()
    for name in ("W_enc", "b_enc", "W_logvar", "b_logvar", "W_dec", "b_dec"):
        grad = getattr(stack, name).grad
        assert all(grad[s].abs().max() > 0 for s in range(2)), name
    for name in ("prior_mean", "prior_logvar", "prior_logit"):
        grad = getattr(stack, name).grad
        assert grad[0].abs().max() > 0 and grad[1].abs().max() == 0, name

    # The bound's analytic gradient, against finite differences (prior, mu and log-variance).
    g = torch.Generator().manual_seed(5)
    args = [torch.randn(3, 4, dtype=torch.float64, generator=g) for _ in range(2)]
    args += [torch.randn(3, 4, 3, dtype=torch.float64, generator=g) for _ in range(2)]
    args.append(torch.randn(3, 4, 3, dtype=torch.float64, generator=g).log_softmax(-1))
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(mixture_kl_bound, args)


def test_fixed_prior_stays_fixed_and_learned_prior_moves():
    stack = make("vsae-mixture", [{"seed": 0}, {"seed": 0, "learn_prior": False}])
    before = [p.detach().clone() for p in (stack.prior_mean, stack.prior_logvar, stack.prior_logit)]
    opt = saev.nn.StackAdam(stack, lr=1e-2)
    stack.train()
    for i in range(3):
        out = stack(data(seed=10 + i))
        opt.zero_grad()
        out.losses["total"].sum().backward()
        opt.step(out.losses["total"])
    after = (stack.prior_mean, stack.prior_logvar, stack.prior_logit)
    for b, a in zip(before, after, strict=True):
        assert not torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_prior_init_and_validation():
    stack = make("vsae-mixture", [{"n_components": 3, "prior_spread": 2.0, "prior_std": 0.5}])
    torch.testing.assert_close(stack.prior_mean[0, 5], torch.tensor([-2.0, 0.0, 2.0]).double())
    torch.testing.assert_close(
        stack.prior_logvar[0], torch.full((F, 3), 2 * math.log(0.5)).double()
    )
    assert stack.prior_logit.abs().max() == 0  # uniform weights
    assert saev.nn.GROUP_HPARAMS["vsae-mixture"] == {"n_components"}
    with pytest.raises(UserError, match="'n_components' must be equal within one stack"):
        saev.nn.make_stack("vsae-mixture", d_vit=D, d_sae=F, members=[{}, {"n_components": 3}])
    bad = {
        "n_components": (0, "n_components=0: expected an integer >= 1"),
        "learn_prior": (1, "learn_prior=1: expected true or false"),
        "prior_std": (
            100.0,
            "prior_std=100.0: its log-variance must lie in [logvar_min, logvar_max]",
        ),
        "prior_spread": (-1.0, "prior_spread=-1.0: expected a value >= 0"),
    }
    for key, (value, msg) in bad.items():
        with pytest.raises(UserError, match=msg.replace("[", "\\[").replace("]", "\\]")):
            saev.nn.check_hparams("vsae-mixture", {key: value})
    with pytest.raises(UserError, match="has no hyperparameter 'prior_corr'"):
        saev.nn.check_hparams("vsae-mixture", {"prior_corr": 0.5})


@pytest.mark.parametrize("family", ["vsae-iso", "vsae-mixture"])
def test_l1_on_relu_z_and_mu_at_inference(family):
    stack = make(family, [{"sparsity_coeff": 0.3}, {"sparsity_coeff": 0.0, "seed": 1}])
    x = data(seed=6)
    stack.train()
    out = stack(x, warmup=0.5)
    f = out.f.detach()
    assert (f >= 0).all()
    # relu's L1 weight, lam * sqrt(d_vit) (docs/families.md, "Loss normalisation").
    l1 = 0.5 * 0.3 * math.sqrt(stack.d_vit) * f[0].sum(-1).mean()
    torch.testing.assert_close(out.losses["sparsity"][0], l1)
    assert out.losses["sparsity"][1].item() == 0.0
    stack.eval()
    mu = stack.pre_acts(stack.scaled(x))
    torch.testing.assert_close(stack.encode(x), mu.relu())


def structured(n, seed, d=16):
    """Sparse non-negative mixtures of 4*d Gaussian atoms (~3% active)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(4 * d, d, generator=torch.Generator().manual_seed(0))
    codes = torch.empty(n, 4 * d).exponential_(generator=g) * (
        torch.rand(n, 4 * d, generator=g) < 0.03
    )
    return codes @ atoms + 1.0


@pytest.mark.parametrize("family", ["vsae-iso", "vsae-mixture"])
def test_l1_makes_the_codes_sparse(family):
    """Regression: with the KL alone (λ = 0, what these families were) far more latents fire."""
    lams = [0.0, 0.25]  # the L1 is weighted by sqrt(d_vit) = 4 here
    stack = saev.nn.make_stack(
        family, d_vit=16, d_sae=64, members=[{"sparsity_coeff": lam} for lam in lams]
    )
    stack.init_from_data(structured(2048, seed=1))
    opt = saev.nn.StackAdam(stack, lr=2e-3)
    stack.train()
    for i in range(80):
        out = stack(structured(128, seed=100 + i))
        opt.zero_grad()
        out.losses["total"].sum().backward()
        opt.step(out.losses["total"])
    stack.eval()
    x = structured(2048, seed=2)
    with torch.no_grad():
        out = stack(x)
    fvu = (x[None] - out.x_hat).pow(2).sum((1, 2)) / (x - x.mean(0)).pow(2).sum()
    l0 = out.l0.tolist()
    assert l0[1] < 0.7 * l0[0], (family, l0)  # measured: 6.4 vs 11.6 of 64
    assert fvu.max() < 0.6, (family, fvu)


def test_mixture_checkpoint_round_trip(tmp_path):
    stack = make("vsae-mixture", [{"n_components": 3, "seed": 0}, {"n_components": 3, "seed": 1}])
    opt = saev.nn.StackAdam(stack, lr=1e-2)
    stack.train()
    for i in range(2):
        out = stack(data(seed=20 + i))
        opt.zero_grad()
        out.losses["total"].sum().backward()
        opt.step(out.losses["total"])
    stack = stack.float()
    ckpt = saev.nn.save(stack, 1, tmp_path / "ck", {"layer": 2})
    sae = saev.nn.load(ckpt)
    assert sae.family == "vsae-mixture" and sae.cfg["hparams"]["n_components"] == 3
    assert sae.stack.prior_mean.shape == (1, F, 3)
    for name in ("prior_mean", "prior_logvar", "prior_logit", "W_logvar"):
        assert torch.equal(getattr(sae.stack, name)[0], getattr(stack, name)[1]), name
    x = data(seed=7).float()
    stack.eval()
    assert torch.equal(sae.encode(x), stack.encode(x)[1])
    sae.stack.train()
    torch.testing.assert_close(
        sae.stack(x).losses["kl"], stack.member_stack(1).train()(x).losses["kl"]
    )
