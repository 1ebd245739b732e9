"""Stacks: members independent, sparse paths equal dense ones, the optimiser, ground truth."""

import functools
import math

import pytest
import torch
from factories import DEVICES

import saev.nn
from saev.nn import sparse

D, F = 8, 32


def data(n=64, seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 2 + 1


def run(family, members, steps, lrs, xs, device="cpu"):
    stack = saev.nn.make_stack(family, d_vit=D, d_sae=F, members=members).double().to(device)
    xs = [x.to(device) for x in xs]
    stack.init_from_data(xs[0])
    opt = saev.nn.StackAdam(stack, lr=lrs, max_grad_norm=0.5)
    stack.train()
    for i in range(steps):
        out = stack(xs[i].double(), warmup=min(1.0, (i + 1) / 2))
        opt.zero_grad()
        out.losses["total"].sum().backward()
        opt.step(out.losses["total"])
    return stack


FAMILY_MEMBERS = {
    "relu": [{"sparsity_coeff": 0.1, "seed": 1}, {"sparsity_coeff": 1.0, "seed": 2}, {"seed": 3}],
    "topk": [
        {"k": 3, "seed": 1, "dead_after_tokens": 64},
        {"k": 6, "k_aux": 4, "seed": 2, "dead_after_tokens": 32},
        {"k": 2, "seed": 3, "aux_coeff": 0.5, "dead_after_tokens": 1},
    ],
    "batchtopk": [
        {"k": 3, "seed": 1, "dead_after_tokens": 32},
        {"k": 5, "seed": 2},
        {"k": 1, "seed": 3},
    ],
    "matryoshka": [
        {"k": 3, "seed": 1},
        {"k": 5, "seed": 2, "dead_after_tokens": 16},
        {"k": 2, "seed": 3},
    ],
    "jumprelu": [{"seed": 1, "target_l0": 4.0}, {"seed": 2, "sparsity_coeff": 0.1}, {"seed": 3}],
    "gated": [{"seed": 1}, {"seed": 2, "sparsity_coeff": 0.2}, {"seed": 3}],
    "vsae-topk": [{"k": 3, "seed": 1}, {"k": 5, "seed": 2, "kl_coeff": 0.0}, {"seed": 3}],
    "vsae-mixture": [
        {"seed": 1},
        {"seed": 2, "learn_prior": False, "prior_spread": 2.0},
        {"seed": 3, "kl_coeff": 3.0, "sparsity_coeff": 0.0},
    ],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", sorted(FAMILY_MEMBERS))
def test_stack_equals_members_trained_alone(family, device):
    members = FAMILY_MEMBERS[family]
    lrs = [1e-2, 3e-3, 2e-2]
    xs = [data(32, seed=i) for i in range(4)]
    together = run(family, members, 4, lrs, xs, device)
    for i, member in enumerate(members):
        alone = run(family, [member], 4, [lrs[i]], xs, device)
        for (name, a), (_, b) in zip(
            alone.state_dict().items(), together.state_dict().items(), strict=True
        ):
            torch.testing.assert_close(
                a[0], b[i], rtol=1e-9, atol=1e-10, msg=f"{family} {name} member {i}"
            )


def test_shared_input_equals_per_member_input():
    stack = saev.nn.make_stack(
        "topk", d_vit=D, d_sae=F, members=[{"k": 3}, {"k": 4, "seed": 5}]
    ).double()
    x = data().double()
    a = stack(x)
    b = stack(x[None].expand(2, *x.shape))
    torch.testing.assert_close(a.x_hat, b.x_hat)


def _grads(fn, params):
    for p in params:
        p.grad = None
    fn().backward()
    return [p.grad.clone() for p in params]


def _randn(g, *shape, device="cpu"):
    """Float64 normals drawn on the CPU (the same numbers on any device), as a leaf on `device`."""
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device).requires_grad_(True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ks", [(4, 4, 4), (1, 4, 2)], ids=["equal-k", "ragged-k"])
def test_sparse_decode_and_encode_equal_dense_values_and_grads(ks, device):
    """The sparse top-k path (ragged k per member) gives the dense path's values and gradients,
    for the parameters and for the input."""
    S, B, K = 3, 7, max(ks)
    g = torch.Generator().manual_seed(0)
    W_dec = _randn(g, S, F, D, device=device)
    b_dec = _randn(g, S, D, device=device)
    W_enc = _randn(g, S, D, F, device=device)
    b_enc = _randn(g, S, F, device=device)
    xs = _randn(g, S, B, D, device=device)
    target = _randn(g, S, B, D, device=device).detach()
    idx = torch.stack(
        [torch.stack([torch.randperm(F, generator=g)[:K] for _ in range(B)]) for _ in range(S)]
    ).to(device)
    params = [W_dec, b_dec, W_enc, b_enc, xs]

    def dense():
        pre = torch.baddbmm(b_enc[:, None], xs - b_dec[:, None], W_enc)
        f = torch.zeros_like(pre)
        for s, k in enumerate(ks):  # member s keeps the first k of its selection
            f[s] = f[s].scatter(1, idx[s, :, :k], pre[s].gather(1, idx[s, :, :k]).relu())
        return ((torch.baddbmm(b_dec[:, None], f, W_dec) - target) ** 2).sum()

    def topk_path():
        with torch.no_grad():
            pre = torch.baddbmm(b_enc[:, None], xs - b_dec[:, None], W_enc)
        layout = sparse.topk_layout(idx, ks, F)
        vals = sparse.gather_pre(pre, xs, b_dec, W_enc, b_enc, layout).relu()
        return ((sparse.decode(W_dec, b_dec, layout, vals) - target) ** 2).sum()

    def positions_path():
        with torch.no_grad():
            pre = torch.baddbmm(b_enc[:, None], xs - b_dec[:, None], W_enc)
        rows = torch.arange(B, device=device)[:, None] * F
        pos = [(idx[s, :, :k] + rows).reshape(-1) for s, k in enumerate(ks)]
        layout = sparse.positions_layout(pos, B, F)
        vals = sparse.gather_pre(pre, xs, b_dec, W_enc, b_enc, layout).relu()
        return ((sparse.decode(W_dec, b_dec, layout, vals) - target) ** 2).sum()

    torch.testing.assert_close(dense(), topk_path())
    torch.testing.assert_close(dense(), positions_path())
    want = _grads(dense, params)
    for fn in (topk_path, positions_path):
        for got, ref in zip(_grads(fn, params), want, strict=True):
            torch.testing.assert_close(got, ref)
    # The decoder gradient touches only the active rows.
    active = torch.zeros(S, F, dtype=torch.bool, device=device)
    for s, k in enumerate(ks):
        active[s, idx[s, :, :k].reshape(-1)] = True
    assert (want[0].abs().sum(-1)[~active] == 0).all()
    # Member s pays for its own k: the layout holds B * sum(k) entries, not B * S * max(k).
    assert sparse.topk_layout(idx, ks, F).cols.numel() == B * sum(ks)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared_input", [False, True])
def test_dense_encoder_and_decoder_products_equal_plain_autograd(shared_input, device):
    """`sparse.dense_pre` (b_dec's gradient from the token sum) and `products.decode` (one GEMM
    per member on the CPU, a batched one on a GPU) give plain autograd's values and gradients,
    the input's included, for a stack and for a non-consecutive subset of its members taken
    with `take_members`."""
    from saev.nn import products
    from saev.nn.stack import take_members

    S, B = 3, 7
    g = torch.Generator().manual_seed(0)
    W_dec = _randn(g, S, F, D, device=device)
    b_dec = _randn(g, S, D, device=device)
    W_enc = _randn(g, S, D, F, device=device)
    b_enc = _randn(g, S, F, device=device)
    xs = _randn(g, 1 if shared_input else S, B, D, device=device)
    target = _randn(g, S, B, D, device=device).detach()
    params = [W_dec, b_dec, W_enc, b_enc, xs]

    def plain(members):
        t = lambda p: p[list(members)]  # noqa: E731
        x = xs if shared_input else t(xs)
        f = torch.baddbmm(t(b_enc)[:, None], x - t(b_dec)[:, None], t(W_enc)).relu()
        return ((torch.baddbmm(t(b_dec)[:, None], f, t(W_dec)) - t(target)) ** 2).sum()

    def ours(members):
        t = lambda p: take_members(p, members)  # noqa: E731
        x = xs if shared_input else t(xs)
        with torch.no_grad():
            pre = products.member_matmul(x - t(b_dec)[:, None], t(W_enc), t(b_enc)[:, None])
        f = sparse.dense_pre(pre, x, t(b_dec), t(W_enc), t(b_enc)).relu()
        return ((products.decode(f, t(W_dec), t(b_dec)) - t(target)) ** 2).sum()

    for members in [(0, 1, 2), (2, 0)]:
        torch.testing.assert_close(ours(members), plain(members))
        got = _grads(functools.partial(ours, members), params)
        want = _grads(functools.partial(plain, members), params)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_layouts_are_valid_csr_with_sorted_columns(device):
    """cuSPARSE needs ascending column indices within each CSR row; torch checks it for us."""
    g = torch.Generator().manual_seed(1)
    S, B = 3, 9
    pre = torch.randn(S, B, F, generator=g).to(device)
    layouts = [
        sparse.topk_layout(pre.topk(7, dim=-1).indices, [7, 2, 5], F),
        sparse.positions_layout(
            [pre[s].reshape(-1).topk(k * B).indices for s, k in enumerate([3, 1, 6])], B, F
        ),
    ]
    for lay in layouts:
        vals = torch.ones(lay.cols.numel(), device=device)
        torch._validate_sparse_csr_tensor_args(lay.crow, lay.cols, vals, (S * B, S * F))
        crow, cols = lay.crow.cpu(), lay.cols.cpu()
        for r in range(S * B):
            row = cols[crow[r] : crow[r + 1]]
            assert (row[1:] > row[:-1]).all()
            assert (torch.div(row, F, rounding_mode="floor") == r // B).all()  # block diagonal
        rows = torch.repeat_interleave(torch.arange(S * B), crow.diff())
        assert torch.equal(lay.rows.cpu(), rows)


def test_empty_rows_in_positions_decode():
    W = torch.randn(1, 4, 3)
    b = torch.zeros(1, 3)
    # B=3, F=4: token 0 latent 1, token 2 latent 1; token 1 has no active latent.
    layout = sparse.positions_layout([torch.tensor([9, 1])], 3, 4)
    out = sparse.decode(W, b, layout, torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(out[0], torch.stack([2 * W[0, 1], torch.zeros(3), 3 * W[0, 1]]))


def test_optimizer_matches_torch_adam_and_keeps_unit_decoder():
    stack = saev.nn.make_stack("relu", d_vit=D, d_sae=F, members=[{"sparsity_coeff": 0.1}]).double()
    ref = saev.nn.make_stack("relu", d_vit=D, d_sae=F, members=[{"sparsity_coeff": 0.1}]).double()
    opt = saev.nn.StackAdam(stack, lr=1e-2, max_grad_norm=0.0)
    topt = torch.optim.Adam(ref.parameters(), lr=1e-2, eps=1e-8)
    for i in range(3):
        x = data(16, seed=i).double()
        for s, o in ((stack, opt), (ref, topt)):
            o.zero_grad()
            s(x).losses["total"].sum().backward()
        ref.project_decoder_grad()
        opt.step()
        topt.step()
        ref.normalize_decoder()
        for a, b in zip(stack.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(stack.W_dec.norm(dim=-1), torch.ones(1, F, dtype=torch.float64))


def test_projection_removes_parallel_component():
    stack = saev.nn.make_stack("relu", d_vit=D, d_sae=F, members=[{}, {}])
    stack.W_dec.grad = stack.W_dec.detach() * 3 + torch.randn_like(stack.W_dec)
    stack.project_decoder_grad()
    dots = (stack.W_dec.grad * stack.W_dec).sum(-1)
    assert dots.abs().max() < 1e-5


def test_per_member_grad_clipping():
    stack = saev.nn.make_stack("relu", d_vit=D, d_sae=F, members=[{}, {}]).double()
    opt = saev.nn.StackAdam(stack, lr=[0.1, 0.1], max_grad_norm=[1e-3, 0.0], betas=(0.0, 0.0))
    before = stack.b_enc.detach().clone()
    for p in stack.parameters():
        p.grad = torch.zeros_like(p)
    stack.b_enc.grad[:, 0] = torch.tensor([5.0, 5.0])
    opt.step()
    # betas=0: update = lr * g / (|g| + eps); the clipped member sees g = 1e-3 (norm 5 -> 1e-3).
    delta = before[:, 0] - stack.b_enc.detach()[:, 0]
    torch.testing.assert_close(
        delta, torch.tensor([0.1 * 1e-3 / (1e-3 + 1e-8), 0.1 * 5 / (5 + 1e-8)], dtype=torch.float64)
    )


def test_fused_and_plain_adam_updates_agree(monkeypatch):
    """The fused kernel (CPU/CUDA) and the plain fallback give the same per-member update,
    with different learning rates and clipping per member and one member frozen."""
    from saev.nn import optim

    members = [{"sparsity_coeff": 0.1, "seed": 1}, {"seed": 2}, {"seed": 3}]
    results = []
    for fused in (True, False):
        monkeypatch.setattr(optim, "_fused_adam_runs_on", lambda p, fused=fused: fused)
        stack = saev.nn.make_stack("relu", d_vit=D, d_sae=F, members=members).double()
        opt = saev.nn.StackAdam(stack, lr=[1e-2, 3e-3, 1e-3], max_grad_norm=[0.05, 0.0, 1.0])
        for i in range(4):
            if i == 2:
                stack.frozen[2] = True
            opt.zero_grad()
            stack(data(16, seed=i).double()).losses["total"].sum().backward()
            opt.step()
        results.append([p.detach().clone() for p in stack.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", ["jumprelu", "vsae-jumprelu"])
@pytest.mark.parametrize("fused", [True, False])
def test_threshold_lr_scale_trains_log_threshold_at_that_multiple_of_the_lr(
    family, fused, monkeypatch
):
    """`threshold_lr_scale` m: log θ follows torch's Adam at lr·m, every other parameter at lr,
    member by member (a member at m = 1 is the plain Adam run)."""
    from saev.nn import optim

    monkeypatch.setattr(optim, "_fused_adam_runs_on", lambda p: fused)
    scales, lrs = [1.0, 10.0, 0.5], [1e-2, 1e-2, 2e-2]
    members = [{"seed": s, "threshold_lr_scale": m, "kl_coeff": 0.0} for s, m in enumerate(scales)]
    if family == "jumprelu":
        members = [{k: v for k, v in m.items() if k != "kl_coeff"} for m in members]
    stack = saev.nn.make_stack(family, d_vit=D, d_sae=F, members=members).double().eval()
    refs = [stack.member_stack(s).double().eval() for s in range(3)]
    opt = saev.nn.StackAdam(stack, lr=lrs, max_grad_norm=0.0)
    topts = [
        torch.optim.Adam(
            [
                {"params": [p for n, p in r.named_parameters() if n != "log_threshold"]},
                {"params": [r.log_threshold], "lr": lr * m},
            ],
            lr=lr,
            eps=1e-8,
        )
        for r, lr, m in zip(refs, lrs, scales, strict=True)
    ]
    for i in range(3):
        x = data(16, seed=i).double()
        opt.zero_grad()
        stack(x).losses["total"].sum().backward()
        opt.step()
        for r, o in zip(refs, topts, strict=True):
            o.zero_grad()
            r(x).losses["total"].sum().backward()
            r.project_decoder_grad()
            o.step()
            r.normalize_decoder()
    for s, r in enumerate(refs):
        for (name, a), b in zip(stack.named_parameters(), r.parameters(), strict=True):
            torch.testing.assert_close(a[s : s + 1], b, msg=f"member {s} {name}")
    # The references above would agree with a stack that ignores the scale only if log θ did
    # not move: member 1 (lr 1e-2 × 10) moves it further than member 0 (lr 1e-2 × 1).
    moved = (stack.log_threshold - math.log(0.1)).abs().mean(-1)
    assert moved[1] > 3 * moved[0] > 0


def test_threshold_lr_scale_must_be_positive():
    with pytest.raises(saev.errors.UserError, match="threshold_lr_scale=0.0: expected a value > 0"):
        saev.nn.make_stack("jumprelu", d_vit=D, d_sae=F, members=[{"threshold_lr_scale": 0.0}])


def test_a_torch_whose_fused_adam_differs_falls_back_to_the_plain_update(monkeypatch):
    """`torch._fused_adam_` is private; if its signature changes, training goes on, exactly."""
    from saev.nn import optim

    def refuse(*args, **kwargs):
        raise TypeError("_fused_adam_() got an unexpected keyword argument")

    monkeypatch.setattr(optim, "_FUSED_UNAVAILABLE", set())  # the fallback marks torch here
    results = []
    for broken in (False, True):
        if broken:
            monkeypatch.setattr(torch, "_fused_adam_", refuse)
        stack = saev.nn.make_stack("relu", d_vit=D, d_sae=F, members=[{"seed": 1}]).double()
        opt = saev.nn.StackAdam(stack, lr=1e-2)
        for i in range(2):
            opt.zero_grad()
            stack(data(16, seed=i).double()).losses["total"].sum().backward()
            opt.step()
        results.append([p.detach().clone() for p in stack.parameters()])
    assert {torch.__version__} == optim._FUSED_UNAVAILABLE
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_nan_member_freezes_others_continue():
    members = [{"k": 3, "seed": 1}, {"k": 3, "seed": 2}]
    stack = saev.nn.make_stack("topk", d_vit=D, d_sae=F, members=members)
    opt = saev.nn.StackAdam(stack, lr=1e-2)
    x = data()
    with torch.no_grad():
        stack.W_enc[1, 0, 0] = float("nan")
    frozen_before = stack.W_enc.detach()[1].clone()
    other_before = stack.W_enc.detach()[0].clone()
    out = stack(x)
    assert torch.isfinite(out.losses["total"][0]) and not torch.isfinite(out.losses["total"][1])
    opt.zero_grad()
    out.losses["total"].sum().backward()
    newly = opt.step(out.losses["total"])
    assert newly.tolist() == [False, True] and stack.frozen.tolist() == [False, True]
    torch.testing.assert_close(stack.W_enc.detach()[1], frozen_before, equal_nan=True)
    assert not torch.equal(stack.W_enc.detach()[0], other_before)
    assert torch.isfinite(stack.W_enc[0]).all()
    # The live member keeps training normally afterwards.
    out = stack(x)
    opt.zero_grad()
    out.losses["total"].sum().backward()
    assert opt.step(out.losses["total"]).tolist() == [False, False]


def test_resume_from_state_dicts_is_exact():
    members = [{"k": 3, "seed": 1, "dead_after_tokens": 32}]
    xs = [data(32, seed=i) for i in range(6)]

    def steps(stack, opt, batches):
        for x in batches:
            out = stack(x)
            opt.zero_grad()
            out.losses["total"].sum().backward()
            opt.step()

    for family, m in (("batchtopk", members), ("vsae-topk", [{"k": 3, "seed": 1}])):
        a = saev.nn.make_stack(family, d_vit=D, d_sae=F, members=m)
        oa = saev.nn.StackAdam(a, lr=1e-2)
        steps(a, oa, xs)
        b = saev.nn.make_stack(family, d_vit=D, d_sae=F, members=m)
        ob = saev.nn.StackAdam(b, lr=1e-2)
        steps(b, ob, xs[:3])
        c = saev.nn.make_stack(family, d_vit=D, d_sae=F, members=m)
        c.load_state_dict(b.state_dict())
        oc = saev.nn.StackAdam(c, lr=1e-2)
        oc.load_state_dict(ob.state_dict())
        steps(c, oc, xs[3:])
        for (name, va), vc in zip(a.state_dict().items(), c.state_dict().values(), strict=True):
            assert torch.equal(va, vc), (family, name)


def test_init_from_data_sets_scale_and_median():
    stack = saev.nn.make_stack("topk", d_vit=D, d_sae=F, members=[{}, {"seed": 1}])
    x = data(256) * 5
    stack.init_from_data(x)
    xs = stack.scaled(x)
    torch.testing.assert_close(xs.norm(dim=-1).mean(-1), torch.full((2,), D**0.5))
    # Geometric median: the sum of unit vectors from it to the points is ~0.
    u = xs[0] - stack.b_dec[0].detach()
    assert (u / u.norm(dim=-1, keepdim=True)).sum(0).norm() < 1e-2 * len(x)


def test_ground_truth_recovery():
    """A topk SAE recovers a known sparse dictionary (d=64, 256 atoms, 4 active per sample).

    Random unit directions in 64 dims have |cos| ~ 0.12 with each other; the best of 512 random
    decoder rows per atom scores ~0.37 (measured at init). A mean max-cosine above 0.9 means
    nearly every atom has a decoder row aligned to it; 150 steps reach ~0.96.
    """
    g = torch.Generator().manual_seed(123)
    d, n_true, active = 64, 256, 4
    atoms = torch.nn.functional.normalize(torch.randn(n_true, d, generator=g), dim=-1)

    def sample(n):
        idx = torch.rand(n, n_true, generator=g).argsort(-1)[:, :active]
        coef = torch.zeros(n, n_true).scatter_(1, idx, torch.rand(n, active, generator=g) * 2 + 0.5)
        return coef @ atoms

    members = [{"k": active, "k_aux": 32, "dead_after_tokens": 2048, "seed": 0}]
    stack = saev.nn.make_stack("topk", d_vit=d, d_sae=512, members=members)
    stack.init_from_data(sample(2048))
    before = (atoms @ stack.W_dec.detach()[0].T).max(-1).values.mean().item()
    opt = saev.nn.StackAdam(stack, lr=1e-2)
    for _ in range(150):
        out = stack(sample(256))
        opt.zero_grad()
        out.losses["total"].sum().backward()
        opt.step()
    mmcs = (atoms @ stack.W_dec.detach()[0].T).max(-1).values.mean().item()
    assert before < 0.5 and mmcs > 0.9, (before, mmcs)


def test_a_tie_at_a_members_boundary_keeps_the_lowest_index_in_any_stack():
    """torch.topk breaks ties by how many entries it was asked for; top_sets does not, so a
    member's prefix of the stack's top max(k) is the set it selects alone."""
    row = torch.tensor([0.5, 3.0, 9.0, 3.0, 3.0, -1.0, 3.0, 0.0])
    values = torch.stack([row, row.flip(0)])[:, None, :]  # [S=2, B=1, N=8]
    vals, idx = sparse.top_sets(values, [2, 5])
    assert sorted(idx[0, 0, :2].tolist()) == [1, 2]  # 9 and the first of the tied 3s
    assert vals[0, 0, :2].tolist() == [9.0, 3.0]
    # Member 1 (the row reversed: 9 at index 5, the 3s at 1, 3, 4, 6) keeps 9, all 3s.
    assert sorted(idx[1, 0, :5].tolist()) == [1, 3, 4, 5, 6]
    for ks, member in [([2], 0), ([2, 7], 0), ([3], 1), ([8, 3], 1)]:
        _, alone = sparse.top_sets(values[member : member + 1], ks[:1])
        _, together = sparse.top_sets(values if member == 0 else values.flip(0), ks)
        k = ks[0]
        assert torch.equal(alone[0, 0, :k].sort().values, together[0, 0, :k].sort().values)


def four_float32_steps(family, members, x, *, d_sae, batch, device="cpu"):
    """A stack initialised from x and trained for four float32 steps on its first 4 * batch
    rows (lr 1e-2, clipping at 0.5): what the bit-identity tests compare."""
    stack = saev.nn.make_stack(
        family, d_vit=x.shape[1], d_sae=d_sae, members=members, device=device
    )
    stack.init_from_data(x)
    opt = saev.nn.StackAdam(stack, lr=1e-2, max_grad_norm=0.5)
    for i in range(4):
        out = stack(x[i * batch : (i + 1) * batch])
        opt.zero_grad()
        out.losses["total"].sum().backward()
        opt.step(out.losses["total"].detach())
    return stack


@pytest.mark.parametrize(
    "family",
    [
        "topk",
        "batchtopk",
        "matryoshka",
        "topk-wide",
        "batchtopk-wide",
        "relu-dense",
        "relu-sparse",
        "relu-mixed",
        "relu",
    ],
)
def test_float32_stack_member_is_bit_identical_to_the_member_alone(family, monkeypatch):
    """In float32, with reductions big enough that torch splits them differently per stack size,
    AuxK live and gradient clipping active, a sweep member's weights equal, bit for bit, the
    same member trained alone (what benchmarks/sweep.py checks on real runs). Each relu member
    picks its path from its own codes: all-dense, all-sparse and mixed stacks are forced, then
    the members choose. "-wide": 2,048 latents and a largest k of 40, so that the members
    alone select through `sparse.largest`'s prefilter and the stack (or BatchTopK's other
    block size) does not; on a CPU with bfloat16 GEMMs "topk-wide" selects through the
    bfloat16 screen (saev.nn.screen), and so does "batchtopk-wide", AuxK included."""
    from saev.nn import families, screen

    screened = []

    def spy(real):
        def call(*args):
            got = real(*args)
            screened.append(got is not None)
            return got

        return call

    for name in ("top_latents", "top_of_batch"):
        monkeypatch.setattr(screen, name, spy(getattr(screen, name)))

    if family.startswith("relu-"):
        path = family.removeprefix("relu-")
        monkeypatch.setattr(
            families.ReLUStack,
            "_sparse_members",
            lambda self, pre: [
                path == "sparse" or (path == "mixed" and m["sparsity_coeff"] > 0.05)
                for m in self.members
            ],
        )
        family = "relu"
    elif family == "relu":
        # Members choose: at 30% active (not ~11%) member 2 turns sparse in step 4, 0 and 1 stay dense.
        monkeypatch.setattr(families.ReLUStack, "sparse_below", 0.3 * (64 + 52) / 64)
    d, f, b, ks = 64, 1024, 1024, (4, 8, 16)
    if family.endswith("-wide"):
        family, f, ks = family.removesuffix("-wide"), 2048, (4, 8, 40)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * b, d, generator=g) * 3 + 1
    if family == "relu":
        members = [{"sparsity_coeff": c, "seed": 0} for c in (0.05, 0.1, 0.4)]
    else:
        members = [{"k": k, "seed": 0, "dead_after_tokens": b, "k_aux": 64} for k in ks]

    together = four_float32_steps(family, members, x, d_sae=f, batch=b)
    for i, member in enumerate(members):
        alone = four_float32_steps(family, [member], x, d_sae=f, batch=b)
        for (name, a), (_, t) in zip(
            alone.state_dict().items(), together.state_dict().items(), strict=True
        ):
            assert torch.equal(a[0], t[i]), f"{family} member {i} {name}"
    if f == 2048 and screen.available(torch.zeros(1), f, f):  # both "-wide" families
        assert screened and all(screened)


@pytest.mark.parametrize("family", ["topk", "batchtopk"])
def test_bfloat16_members_with_equal_k_match_their_alone_runs(family):
    """Under bfloat16 autocast ties are torch.topk's (or the prefilter's) choice, not repaired;
    members with the same k still train as they do alone: each member's selection takes its
    own path. 2,048 latents: `sparse.largest`'s bfloat16 prefilter is in play."""
    d, f, b = 64, 2048, 512
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * b, d, generator=g) * 3 + 1
    members = [{"k": 16, "seed": s} for s in range(3)]

    def three_steps(ms):
        stack = saev.nn.make_stack(family, d_vit=d, d_sae=f, members=ms)
        stack.init_from_data(x)
        opt = saev.nn.StackAdam(stack, lr=1e-2)
        for i in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = stack(x[i * b : (i + 1) * b])
            opt.zero_grad()
            out.losses["total"].sum().backward()
            opt.step(out.losses["total"].detach())
        return stack

    together = three_steps(members)
    for i, member in enumerate(members):
        alone = three_steps([member])
        for (name, a), (_, t) in zip(
            alone.state_dict().items(), together.state_dict().items(), strict=True
        ):
            assert torch.equal(a[0], t[i]), f"member {i} {name}"


def assert_brute_force_sets(values, ks, vals, idx):
    """Each member's first k of (vals, idx) are its k largest, ties broken by the lowest index,
    as sorting by (value descending, index ascending) picks them; rows whose k-th value is
    -inf (masked entries) may hold any of them."""
    for s, k in enumerate(ks):
        for b in range(values.shape[1]):
            row = values[s, b].tolist()
            want = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
            if row[want[-1]] == -math.inf:
                continue
            assert sorted(idx[s, b, :k].tolist()) == sorted(want), (s, b)
            assert vals[s, b, :k].tolist() == sorted((row[i] for i in want), reverse=True)


def test_top_sets_with_many_ties_match_a_brute_force_choice():
    """Integer-valued rows, full of ties: every member's set is its k largest, ties broken by
    the lowest index, as sorting by (value descending, index ascending) picks them."""
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 4, (3, 50, 12), generator=g).float()
    values[1, :5] = -math.inf  # AuxK's masked rows
    ks = [2, 7, 5]
    assert_brute_force_sets(values, ks, *sparse.top_sets(values, ks))


def test_top_sets_over_whole_batches_breaks_ties_the_same_way():
    """BatchTopK selects over a flattened [S, B*F]: one row per member."""
    values = torch.tensor([[3.0, 1, 3, 3, 0, 3], [1.0, 1, 1, 2, 2, 0]])
    vals, idx = sparse.top_sets(values, [2, 3])
    assert idx[0, :2].tolist() == [0, 2] and vals[0, :2].tolist() == [3.0, 3.0]
    assert sorted(idx[1].tolist()) == [0, 3, 4] and vals[1].tolist() == [2.0, 2.0, 1.0]


def test_largest_gives_torch_topks_values_through_its_prefilter(monkeypatch):
    """Rows long enough for the block-max prefilter: the values are torch.topk's bit for bit and
    the indices point at them; rows it must not handle (NaN, -inf, all equal) fall back."""
    widths = []
    topk = torch.Tensor.topk
    monkeypatch.setattr(
        torch.Tensor, "topk", lambda t, *a, **kw: widths.append(t.shape[-1]) or topk(t, *a, **kw)
    )
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        v = torch.randn(2, 300, 4096, generator=g, dtype=dtype)
        ties = (v * 20).round()  # values repeat often, even among the largest
        short = torch.randn(2, 300, 512, generator=g, dtype=dtype)
        cases = [(v, 33), (v, 5), (ties, 17), (v[0], 64), (v, 65), (v, 256)]  # 65, 256: blocks of 8
        # Rows of 512 past torch.topk's switch to nth_element (m * 64 > n): blocks of 8.
        cases += [(short, 9), ((short * 20).round(), 17), (short, 32)]
        for values, m in cases:
            widths.clear()
            vals, idx = sparse.largest(values, m)
            assert widths[-1] < values.shape[-1] // 4, "the prefilter was not used"
            assert torch.equal(vals, values.topk(m, dim=-1).values)
            assert torch.equal(values.gather(-1, idx), vals)
            assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # distinct latents
        for bad in ("nan", "-inf", "equal"):
            w = v.clone()
            w[1, 7] = {"nan": float("nan"), "-inf": -math.inf, "equal": 1.0}[bad]
            if bad == "-inf":
                w[1, 7, :10] = 0.0  # fewer than m finite entries in the row
            widths.clear()
            vals, idx = sparse.largest(w, 33)
            assert widths[-1] == 4096, bad  # the whole tensor went to torch.topk
            assert torch.equal(vals.nan_to_num(), w.topk(33, dim=-1).values.nan_to_num())


@pytest.mark.parametrize(("n", "ks"), [(2048, [2, 16, 9]), (512, [8, 31, 16])])
def test_top_sets_on_long_rows_with_ties_match_a_brute_force_choice(n, ks):
    """As above, on rows that take `largest`'s prefilter (ties among the largest): blocks of
    32 at 2,048, blocks of 8 at 512 (k + 1 = 32 is past torch.topk's partial sort)."""
    assert sparse._prefilter_block(n, max(ks) + 1) == (32 if n == 2048 else 8)
    g = torch.Generator().manual_seed(1)
    values = torch.randint(0, 600, (3, 40, n), generator=g).float()
    assert_brute_force_sets(values, ks, *sparse.top_sets(values, ks))


def test_squared_errors_gradient_is_autograds_bit_for_bit():
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(3, 37, 8, generator=g, requires_grad=True)
    recon = torch.randn(3, 37, 8, generator=g, requires_grad=True)
    weights = torch.tensor([0.3, 1.7, 5.0])
    got = saev.nn.stack.squared_error(xs, recon)
    gx, gr = torch.autograd.grad((got * weights).sum(), (xs, recon))
    want = (xs - recon).pow(2).sum(-1).mean(-1)
    wx, wr = torch.autograd.grad((want * weights).sum(), (xs, recon))
    assert torch.equal(got, want) and torch.equal(gx, wx) and torch.equal(gr, wr)


def test_squared_error_of_a_shared_input_sums_its_gradient_over_members():
    xs = torch.randn(1, 5, 4, requires_grad=True)
    recon = torch.randn(3, 5, 4, requires_grad=True)
    got = torch.autograd.grad(saev.nn.stack.squared_error(xs, recon).sum(), (xs, recon))
    want = torch.autograd.grad((xs - recon).pow(2).sum(-1).mean(-1).sum(), (xs, recon))
    assert got[0].shape == (1, 5, 4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_largest_of_no_rows_is_empty():
    vals, idx = sparse.largest(torch.empty(0, 4096), 33)
    assert vals.shape == idx.shape == (0, 33)


@pytest.mark.parametrize("F_", [F, 30_000])  # S*F within 16 bits (numpy's radix sort) or not
def test_layout_by_column_orders_entries_by_column_then_row(F_):
    g = torch.Generator().manual_seed(6)
    S, B, k = 3, 50, 5
    lay = sparse.topk_layout(
        torch.randn(S, B, F_, generator=g).topk(k, dim=-1).indices, [k] * S, F_
    )
    order, rows, ccol = lay.by_col()
    want = sorted(range(lay.cols.numel()), key=lambda i: (int(lay.cols[i]), int(lay.rows[i])))
    assert order.dtype == torch.int64 and order.tolist() == want
    assert torch.equal(rows, lay.rows[order])
    counts = torch.bincount(lay.cols, minlength=S * F_)
    assert torch.equal(ccol, torch.cat([counts.new_zeros(1), counts.cumsum(0)]))


@pytest.mark.parametrize("device", DEVICES)
def test_flat_nonzero_is_torchs_flattened_nonzero(device):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 40, 17, generator=g).to(device)
    cases = [
        x > 1.0,  # sparse
        x > -3.0,  # nearly all
        x > 10.0,  # none
        (x > 0).transpose(1, 2),  # not contiguous: positions in the logical (row-major) order
        torch.where(x > 0.5, x, 0.0),  # a float tensor: its nonzero entries
        torch.ones(0, 5, dtype=torch.bool, device=device),
    ]
    for mask in cases:
        got = sparse.flat_nonzero(mask)
        assert got.dtype == torch.int64 and got.device == mask.device
        assert torch.equal(got, mask.reshape(-1).nonzero().squeeze(1))


@pytest.mark.parametrize("high", [3, 10_000])  # ties at the boundary in most rows; in none
def test_top_mask_keeps_each_rows_k_largest_lowest_columns_at_a_tie(high):
    g = torch.Generator().manual_seed(4)
    values = torch.randint(0, high, (40, 30), generator=g).double()
    keep = sparse.top_mask(values, 7)
    for row, kept in zip(values.tolist(), keep.tolist(), strict=True):
        want = sorted(range(len(row)), key=lambda i: (-row[i], i))[:7]
        assert [i for i, k in enumerate(kept) if k] == sorted(want)


def test_decoder_gradient_projection_of_a_member_is_the_same_in_any_stack():
    """At d_vit >= 512 a batched product over a whole stack rounds differently from a
    one-member one; the projection runs member by member."""
    mem = [{"k": 4, "seed": i} for i in range(3)]
    big = saev.nn.make_stack("topk", d_vit=768, d_sae=256, members=mem)
    one = saev.nn.make_stack("topk", d_vit=768, d_sae=256, members=[mem[1]])
    grad = torch.randn(3, 256, 768, generator=torch.Generator().manual_seed(6))
    big.W_dec.grad, one.W_dec.grad = grad.clone(), grad[1:2].clone()
    big.project_decoder_grad()
    one.project_decoder_grad()
    assert torch.equal(big.W_dec.grad[1], one.W_dec.grad[0])
    # What remains is orthogonal to each (unit) decoder row.
    dots = (big.W_dec.grad * big.W_dec.detach()).sum(-1)
    assert dots.abs().max() < 1e-4
