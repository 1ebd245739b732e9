"""Variational SAEs: a mean head μ and a log-variance head log σ² per latent, a sampled
z = μ + σ·ε (training only; μ at inference), then a sparsity rule, plus β·KL(q(z|x) ‖ prior).

Every family pairs a prior with the sparsity rule of a deterministic family: vsae-topk,
vsae-gated and vsae-jumprelu that of topk, gated and jumprelu; vsae-iso and vsae-mixture
that of relu (an L1 on ReLU(z)). The prior is N(0, I), except vsae-mixture's per-latent
Gaussian mixture. A KL alone does not switch latents off (it pulls μ towards the prior's
mean 0, the edge of ReLU, not below it), so every family has a sparsity rule.

Fixes the faults of the published fork (DESIGN §4): no sampling at inference (train flag,
not a global), every coefficient may be 0, the KL is normalised per latent (a mean over
latents, so β means the same at every width), log σ² is clamped to [logvar_min, logvar_max],
and decoder rows stay unit norm (stack.py), so the KL cannot be escaped by shrinking codes
and growing the decoder. Noise is drawn per member from (seed, step), so a member's noise
does not depend on its stack and a resumed run draws the same noise.
"""

import torch
from jaxtyping import Float
from torch import Tensor, nn

from saev.nn import families, sparse
from saev.nn.stack import Codes, Stack


class VariationalStack(Stack):
    """Shared heads, sampling and KL; subclasses pick μ and the sparsity rule."""

    samples = True

    def _init_family(self):
        self.W_logvar = nn.Parameter(torch.zeros(self.S, self.d_vit, self.d_sae))
        self.b_logvar = nn.Parameter(torch.zeros(self.S, self.d_sae))
        self.register_buffer("noise_step", torch.zeros(self.S, dtype=torch.long))

    def _logvar(self, xs: Tensor) -> Tensor:
        # As the encoder's pre-activations: autograd's backward of the plain expression spent a
        # fifth of a vsae-topk step (d_vit 384, 8x) on b_dec's gradient.
        lv = self._centred_affine(xs, self.W_logvar, self.b_logvar)
        lo = self.hp("logvar_min")[:, None, None].to(lv.dtype)
        hi = self.hp("logvar_max")[:, None, None].to(lv.dtype)
        return torch.clamp(lv, lo, hi)

    def _noise(self, shape: tuple[int, int], dtype, device) -> Tensor:
        eps = []
        for s, member in enumerate(self.members):
            gen = torch.Generator(device=device).manual_seed(
                member["seed"] * 1_000_003 + int(self.noise_step[s])
            )
            eps.append(torch.randn(shape, generator=gen, device=device, dtype=dtype))
        with torch.no_grad():
            self.noise_step.add_(1)
        return torch.stack(eps)

    def _sample(self, mu: Tensor, logvar: Tensor, train: bool) -> Tensor:
        if not train:
            return mu
        return mu + (0.5 * logvar).exp() * self._noise(mu.shape[1:], mu.dtype, mu.device)

    def _kl(self, mu: Tensor, logvar: Tensor) -> Tensor:
        """KL(N(μ, σ²) ‖ N(0, 1)) summed over latents / d_sae, mean over tokens: [S]."""
        kl = 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar)
        return kl.mean(-1).mean(-1)

    def _variational(
        self, xs: Tensor, mu: Tensor, train: bool, warm: Tensor
    ) -> tuple[Tensor, Tensor]:
        logvar = self._logvar(xs)
        z = self._sample(mu, logvar, train)
        return z, self.hp("kl_coeff") * warm * self._kl(mu, logvar)


class VTopKStack(VariationalStack):
    family = "vsae-topk"

    def _encode(self, xs, train, warm):
        S, B = xs.shape[:2]
        z, kl = self._variational(xs, self.pre_acts(xs), train, warm)
        ks = self.hp_ints("k")
        with torch.no_grad():
            layout = sparse.topk_layout(sparse.top_sets(z, ks)[1], ks, self.d_sae)
        vals = torch.relu(z.reshape(-1)[layout.flat])
        return Codes(S, B, self.d_sae, layout=layout, vals=vals), {"kl": kl}, None


class VGatedStack(VariationalStack):
    family = "vsae-gated"

    def _init_family(self):
        super()._init_family()
        self.r_mag = nn.Parameter(torch.zeros(self.S, self.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(self.S, self.d_sae))

    def _encode(self, xs, train, warm):
        pi_gate, pi_mag = families.gated_paths(self, xs)
        z, kl = self._variational(xs, pi_mag, train, warm)
        f = (pi_gate > 0) * torch.relu(z)
        losses = families.gated_losses(self, xs, pi_gate, warm)
        losses["kl"] = kl
        return Codes(self.S, xs.shape[1], self.d_sae, dense=f), losses, None


class VJumpReLUStack(VariationalStack):
    family = "vsae-jumprelu"

    def _init_family(self):
        super()._init_family()
        init = self.hp("threshold_init").log()[:, None].expand(self.S, self.d_sae)
        self.log_threshold = nn.Parameter(init.clone())

    def lr_scales(self):
        return families.threshold_lr_scales(self)

    def _encode(self, xs, train, warm):
        z, kl = self._variational(xs, self.pre_acts(xs), train, warm)
        f, sparsity = families.jumprelu_codes(self, z, warm)
        return (
            Codes(self.S, xs.shape[1], self.d_sae, dense=f),
            {"sparsity": sparsity, "kl": kl},
            None,
        )


def _relu_l1(stack: VariationalStack, z: Tensor, warm: Tensor) -> tuple[Tensor, Tensor]:
    """The relu family's rule on z: f = ReLU(z), loss λ·√d_vit·Σᵢ fᵢ (mean over tokens), λ warmed up.

    Without it nothing but the reconstruction and the noise decides which latents are off:
    the KL pulls μ towards the prior's mean 0, the edge of ReLU, not below it.
    """
    f = torch.relu(z)
    return f, families.l1_coeff(stack, warm) * f.sum(-1).mean(-1)


class VIsoStack(VariationalStack):
    """Isotropic prior N(0, I); codes by the relu family's rule, f = ReLU(z) with λ·Σᵢ fᵢ."""

    family = "vsae-iso"

    def _encode(self, xs, train, warm):
        z, kl = self._variational(xs, self.pre_acts(xs), train, warm)
        f, sparsity = _relu_l1(self, z, warm)
        return (
            Codes(self.S, xs.shape[1], self.d_sae, dense=f),
            {"sparsity": sparsity, "kl": kl},
            None,
        )


class VMixtureStack(VIsoStack):
    """A Gaussian-mixture prior per latent, p(zᵢ) = Σₖ πᵢₖ N(mᵢₖ, sᵢₖ²), K = `n_components`;
    codes and L1 as vsae-iso.

    The means start evenly spaced over [−prior_spread, prior_spread] (0 when K = 1), every
    std at `prior_std`, the weights uniform; with `learn_prior` the KL term trains all three
    per latent, otherwise they stay fixed. log sᵢₖ² is clamped like log σ².

    KL(q ‖ mixture) has no closed form. We use the variational upper bound of Hershey & Olsen
    (2007) for a single Gaussian q against a mixture:

        KL(q ‖ Σₖ πₖ gₖ) ≤ −log Σₖ πₖ exp(−KL(q ‖ gₖ)),

    Jensen's inequality on log Σₖ πₖ gₖ(z) with the optimal weights φₖ ∝ πₖ e^{−KL(q‖gₖ)}.
    It is deterministic (no second noise source, the same in train and eval mode), ≥ 0,
    exact for K = 1 (the closed-form Gaussian KL) and tight when q sits on one well-separated
    component. Training minimises it, so the objective stays a bound on the ELBO.
    """

    family = "vsae-mixture"

    def _init_family(self):
        super()._init_family()
        S, F, K = self.S, self.d_sae, max(self.hp_ints("n_components"))
        grid = torch.linspace(-1.0, 1.0, K) if K > 1 else torch.zeros(1)
        means = self.hp("prior_spread")[:, None] * grid  # [S, K]
        logvar = 2.0 * self.hp("prior_std").log()  # [S]
        self.prior_mean = nn.Parameter(means[:, None, :].expand(S, F, K).clone())
        self.prior_logvar = nn.Parameter(logvar[:, None, None].expand(S, F, K).clone())
        self.prior_logit = nn.Parameter(torch.zeros(S, F, K))

    def prior(self) -> tuple[Tensor, Tensor, Tensor]:
        """Means, clamped log-variances and log-weights of the prior, each [S, F, K]; members
        without `learn_prior` get no gradient into them."""
        learn = (self.hp("learn_prior") > 0)[:, None, None]
        mean, logvar, logit = (
            torch.where(learn, p, p.detach())
            for p in (self.prior_mean, self.prior_logvar, self.prior_logit)
        )
        lo = self.hp("logvar_min")[:, None, None].to(logvar.dtype)
        hi = self.hp("logvar_max")[:, None, None].to(logvar.dtype)
        return mean, torch.maximum(torch.minimum(logvar, hi), lo), logit.log_softmax(-1)

    def _kl(self, mu, logvar):
        """The Hershey-Olsen bound per latent, mean over latents and tokens: [S]."""
        mean, prior_lv, log_w = (t[:, None] for t in self.prior())  # [S, 1, F, K]
        return mixture_kl_bound(mu, logvar, mean, prior_lv, log_w).mean(-1).mean(-1)


# The training hot path: annotated, not checked at run time.
def mixture_kl_bound(
    mu: Float[Tensor, "*shape"],
    logvar: Float[Tensor, "*shape"],
    mean: Float[Tensor, "*prior K"],
    prior_logvar: Float[Tensor, "*prior K"],
    log_weight: Float[Tensor, "*prior K"],
) -> Float[Tensor, "*shape"]:
    """−log Σₖ wₖ exp(−KL(N(μ, σ²) ‖ N(mₖ, sₖ²))) elementwise (Hershey & Olsen 2007).

    `mu`, `logvar`: [...]; `mean`, `prior_logvar`, `log_weight` (normalised over K): [..., K],
    broadcasting against `mu[..., None]`. Returns [...], each ≥ 0 and ≥ the true KL.
    """
    mu, logvar = mu[..., None], logvar[..., None]
    kl = 0.5 * (
        prior_logvar - logvar + (logvar.exp() + (mu - mean).pow(2)) / prior_logvar.exp() - 1
    )
    return -torch.logsumexp(log_weight - kl, dim=-1)
