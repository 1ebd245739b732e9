"""The bfloat16 screen of the top-k selection: exactly the top k of its float32 values."""

import math

import pytest
import torch

import saev.nn
from saev.nn import families, screen, sparse

needs_bf16 = pytest.mark.skipif(
    not screen.available(torch.zeros(1), 2048, 2048), reason="needs a CPU with bfloat16 GEMMs"
)


def exact_values(a, W_rows, b):
    """Every latent's value as the screen computes its candidates': the sampled product over
    the full layout (one float32 dot product per entry), plus b."""
    B, F_ = a.shape[0], W_rows.shape[0]
    lay = sparse.flat_layout(torch.arange(B * F_), 1, B, F_)
    return (lay.sampled(a, W_rows) + b.repeat(B)).view(B, F_)


def brute_force(v, k):
    """Each row's k largest, ties broken by the lowest latent: (latents ascending, values)."""
    lat = torch.tensor(
        [sorted(sorted(range(v.shape[1]), key=lambda j: (-row[j], j))[:k]) for row in v.tolist()]
    )
    return lat, v.gather(1, lat)


def case(kind, B=128, d=768, F_=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, d, generator=g) * 3
    W = torch.randn(F_, d, generator=g) / d**0.5
    b = torch.zeros(F_)
    if kind == "bias":  # a wide spread of biases and of encoder norms
        b = torch.randn(F_, generator=g) * 2
        W = W * torch.rand(F_, 1, generator=g) * 3
    if kind == "ties":  # latents in equal pairs: equal values, ties at every boundary
        W[1::2] = W[::2]
        b[1::2] = b[::2]
    if kind == "offset":  # a shared input direction: every pre-activation far from 0
        a = a + 40 * torch.randn(1, d, generator=g)
    if kind == "zeros":  # tokens whose every value is 0: no positive threshold, whole rows
        a[::16] = 0
    return a, W, b


@needs_bf16
@pytest.mark.parametrize("kind", ["gauss", "bias", "ties", "offset", "zeros"])
@pytest.mark.parametrize("k", [1, 8, 32])
def test_screen_keeps_the_exact_top_k_of_its_float32_values(kind, k):
    a, W, b = case(kind)
    got = screen.top_latents(a, W, b, k)
    assert got is not None
    lat, vals = got
    want_lat, want_vals = brute_force(exact_values(a, W, b), k)
    assert torch.equal(lat, want_lat)
    assert torch.equal(vals, want_vals)  # bit for bit
    # The values are float32 pre-activations, up to the rounding of another summation order.
    torch.testing.assert_close(vals, (a @ W.t() + b).gather(1, lat), rtol=1e-5, atol=1e-4)


@needs_bf16
@pytest.mark.parametrize("kind", ["gauss", "bias", "ties", "offset", "zeros"])
@pytest.mark.parametrize("k", [1, 8, 32])
def test_batch_screen_keeps_the_exact_top_k_b_of_its_float32_values(kind, k):
    a, W, b = case(kind, B=64)
    got = screen.top_of_batch(a, W, b, k * 64)
    assert got is not None
    pos, vals = got
    v = exact_values(a, W, b).view(-1)
    flat = v.tolist()
    want = torch.tensor(sorted(sorted(range(len(flat)), key=lambda i: (-flat[i], i))[: k * 64]))
    assert torch.equal(pos, want)
    assert torch.equal(vals, v[want])


@needs_bf16
def test_screen_at_small_d_vit_and_with_a_transposed_encoder():
    a, W, b = case("bias", d=64, F_=4096)
    W_t = W.t().contiguous()  # the stack's W_enc is [d, F]; its rows a transposed view
    lat, vals = screen.top_latents(a, W_t.t(), b, 16)
    want_lat, want_vals = brute_force(exact_values(a, W, b), 16)
    assert torch.equal(lat, want_lat) and torch.equal(vals, want_vals)


@needs_bf16
def test_screen_gives_up_where_it_cannot_bound():
    a, W, b = case("gauss", d=64)
    bad = a.clone()
    bad[3, 5] = math.nan
    assert screen.top_latents(bad, W, b, 8) is None
    # Every pre-activation negative: the k-th largest screen value is not positive.
    assert screen.top_latents(a, W, b - 1e3, 8) is None
    assert screen.top_latents(a, W, b, 2048 // screen.BLOCK + 1) is None  # k above the blocks


@needs_bf16
def test_screened_stack_codes_and_gradients(monkeypatch):
    """A topk stack wide enough for the screen keeps, per token and member, the top k of the
    screen's values, and its gradients are those of the dense expression with that selection;
    a member the screen gives up on (its inputs shifted far below zero) takes the float32 GEMM."""
    calls = []
    real = screen.top_latents
    monkeypatch.setattr(screen, "top_latents", lambda *args: (r := real(*args), calls.append(r))[0])
    d, F_, B = 64, 2048, 96
    members = [{"k": 8, "seed": 0}, {"k": 16, "seed": 1}]
    stack = saev.nn.make_stack("topk", d_vit=d, d_sae=F_, members=members)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d, generator=g) * 2 + 1
    stack.init_from_data(x)
    with torch.no_grad():
        stack.b_enc[1] -= 1e4  # member 1: every pre-activation negative, the screen gives up
    calls.clear()
    out = stack.train()(x)
    assert calls[0] is not None and calls[1] is None
    params = [stack.W_enc, stack.b_enc, stack.W_dec, stack.b_dec]
    got = torch.autograd.grad(out.losses["total"].sum(), params)

    xs = stack.scale[:, None, None] * x
    pre = (
        torch.einsum("sbd,sdf->sbf", xs - stack.b_dec[:, None], stack.W_enc) + stack.b_enc[:, None]
    )
    a0 = (xs[0] - stack.b_dec[0]).detach()
    lat0, vals0 = brute_force(
        exact_values(a0, stack.W_enc[0].t().detach(), stack.b_enc[0].detach()), 8
    )
    lat1 = pre[1].detach().topk(16, dim=-1).indices.sort(-1).values
    for s, lat in enumerate([lat0, lat1]):
        keep = torch.zeros(B, F_, dtype=torch.bool).scatter_(1, lat, True)
        assert torch.equal(out.f[s].detach() != 0, keep & (pre[s] > 0))
    assert torch.equal(out.f[0].detach().gather(1, lat0), vals0.relu())
    f = torch.stack(
        [
            torch.relu(pre[s]) * torch.zeros(B, F_).scatter_(1, lat, 1.0)
            for s, lat in enumerate([lat0, lat1])
        ]
    )
    recon = torch.einsum("sbf,sfd->sbd", f, stack.W_dec) + stack.b_dec[:, None]
    want = torch.autograd.grad(((xs - recon) ** 2).sum(-1).mean(-1).sum(), params)
    for name, a, w in zip(["W_enc", "b_enc", "W_dec", "b_dec"], got, want, strict=True):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5, msg=name)


@needs_bf16
def test_screened_auxk_on_each_path_matches_the_float32_gemm(monkeypatch):
    """AuxK of a screened member computes its dead columns with their own GEMM; on each of its
    paths (sparse, dense masked, dense all) the loss and gradients agree with AuxK over the
    whole float32 GEMM (the screen turned off) to float32 rounding."""
    f_, d, b = 2048, 32, 64
    members = [{"k": 4, "k_aux": k_aux, "seed": i} for i, k_aux in enumerate([16, 64, 256])]
    dead = torch.zeros(3, f_, dtype=torch.bool)
    dead[0, :300] = True  # 300 > 4*16: sparse
    dead[1, 100:300] = True  # 64 < 200 <= 256: dense, masked
    dead[2, ::9] = True  # 228 <= 256: dense, every dead latent
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, d, generator=g) * 2

    def aux(screen_from):
        monkeypatch.setattr(families.TopKStack, "screen_from_d_sae", screen_from)
        stack = saev.nn.make_stack("topk", d_vit=d, d_sae=f_, members=members)
        stack.init_from_data(x)
        with torch.no_grad():
            stack.tokens_since_fired.copy_(dead * 10**9)
        out = stack.train()(x)
        params = [stack.W_enc, stack.b_enc, stack.W_dec, stack.b_dec]
        return out.losses["aux"], torch.autograd.grad(out.losses["aux"].sum(), params)

    loss, grads = aux(2048)
    want_loss, want_grads = aux(None)
    assert (loss > 0).all()
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=0)
    for a, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, w, rtol=1e-3, atol=1e-5)


def test_largest_of_bfloat16_rows_gives_torch_topks_values():
    g = torch.Generator().manual_seed(0)
    v = (torch.randn(64, 4096, generator=g) + 0.5).bfloat16()
    got_vals, got_idx = sparse.largest(v, 33)
    want = v.topk(33, dim=-1)
    assert torch.equal(got_vals, want.values)
    assert torch.equal(v.gather(1, got_idx), want.values)
    v[5] = -1.0  # a row with no positive entry: torch.topk for the whole tensor
    assert torch.equal(sparse.largest(v, 33)[0], v.topk(33, dim=-1).values)


def test_bfloat16_top_sets_choose_per_member():
    """Of equal bfloat16 values a member keeps what it keeps alone, whatever the other members'
    rows make `largest` do (here one all-negative row of member 1 sends its rows to torch.topk)."""
    g = torch.Generator().manual_seed(0)
    m0 = (torch.randn(256, 2048, generator=g).abs() + 0.05).bfloat16()  # ties at every k
    m1 = m0.clone()
    m1[0] = -1.0
    together = sparse.top_sets(torch.stack([m0, m1]), [16, 16])[1][0]
    alone = sparse.top_sets(m0[None], [16])[1][0]
    assert torch.equal(together, alone)
