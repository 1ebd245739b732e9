"""saev 0.1's inference snippet runs unchanged: `saev.activations` and a loaded 0.1 `sae.pt`."""

import PIL.Image
import pytest
import torch
from saev01 import SAE_CFG, forward, random_state, write_sae_pt

import saev.activations
import saev.nn
import saev.vits
from saev.errors import UserError
from saev.nn.checkpoint import LegacySAE, Loss

# timm's test_vit: 160 px images, 10 x 10 patches, a CLS token, d_vit 64, 6 blocks.
N_PATCHES, D_VIT, D_SAE = 100, 64, 128


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return saev.vits.make_vit("timm", "test_vit", pretrained=False)


@pytest.fixture(scope="module")
def sae_pt(tmp_path_factory):
    state = random_state(D_VIT, D_SAE, seed=1)
    path = tmp_path_factory.mktemp("ckpt") / "sae.pt"
    write_sae_pt(path, state, {**SAE_CFG, "d_vit": D_VIT})
    return path, state


def test_the_01_inference_snippet(vit, sae_pt):
    """saev 0.1's inference guide, line for line (random weights instead of CLIP's)."""
    path, state = sae_pt
    sae = saev.nn.load(path)
    img_transform = saev.activations.make_img_transform("timm", "test_vit")
    recorded_vit = saev.activations.RecordedVisionTransformer(vit, N_PATCHES, True, [3])
    img = PIL.Image.new("RGB", (200, 180), (120, 40, 200))
    x = img_transform(img)
    x = x[None, ...]
    _, vit_acts = recorded_vit(x)
    assert vit_acts.shape == (1, 1, N_PATCHES + 1, D_VIT) and vit_acts.device.type == "cpu"
    vit_acts = vit_acts[:, 0, 1:, :]
    x_hat, f_x, loss = sae(vit_acts)

    assert isinstance(sae, LegacySAE) and isinstance(loss, Loss)
    assert x_hat.shape == (1, N_PATCHES, D_VIT) and f_x.shape == (1, N_PATCHES, D_SAE)
    want_hat, want_f, want_loss = forward(state, vit_acts[0], SAE_CFG["sparsity_coeff"])
    torch.testing.assert_close(x_hat[0], want_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_x[0], want_f, rtol=1e-5, atol=1e-5)
    for got, want in zip(loss, want_loss, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # The recorder's activations are saev.vits.Recorder's, CLS first.
    recorded_vit.recorder.remove()
    _, acts = saev.vits.Recorder(vit, [3])(x)
    torch.testing.assert_close(acts.cpu()[:, 0, 1:], vit_acts)


@pytest.mark.parametrize("batch", [1, 3])
def test_a_01_sae_returns_three_values_for_any_batch(sae_pt, batch):
    """0.1 users write `x_hat, f_x, loss = sae(acts)`; saev's own SAEs return x_hat alone,
    which for a batch of 1 raised and for a batch of 3 silently bound three rows."""
    path, state = sae_pt
    sae = saev.nn.load(path)
    acts = torch.randn(batch, D_VIT, generator=torch.Generator().manual_seed(batch))
    x_hat, f_x, loss = sae(acts)
    assert x_hat.shape == (batch, D_VIT) and f_x.shape == (batch, D_SAE)
    want_hat, _, (mse, sparsity, ghost, l0, l1) = forward(state, acts, 4e-4)
    torch.testing.assert_close(x_hat, want_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.loss, mse + sparsity + ghost, rtol=1e-4, atol=1e-6)
    assert loss.ghost_grad.item() == 0.0 and loss.l0.item() == pytest.approx(l0.item())
    # saev's own SAEs keep their API: `sae(x)` is the reconstruction.
    saev.nn.save(sae, 0, path.parent / "saved")
    again = saev.nn.load(path.parent / "saved")
    assert not isinstance(again, LegacySAE)
    torch.testing.assert_close(again(acts), x_hat)


def test_loss_is_01s_named_tuple():
    """0.1's saev/nn.py: `Loss(mse, sparsity, ghost_grad, l0, l1)` with a `loss` property."""
    assert Loss._fields == ("mse", "sparsity", "ghost_grad", "l0", "l1")
    terms = Loss(*(torch.tensor(v) for v in (1.0, 0.25, 0.0, 3.0, 4.0)))
    assert terms.loss.item() == 1.25
    mse, sparsity, ghost_grad, l0, l1 = terms  # unpacks like 0.1's
    assert (mse.item(), l1.item()) == (1.0, 4.0)


def test_recorder_checks_the_01_numbers_against_the_model(vit):
    with pytest.raises(UserError, match=r"n_patches_per_img=196.*has 100 patches per image"):
        saev.activations.RecordedVisionTransformer(vit, 196, True, [10])
    with pytest.raises(UserError, match="cls_token=False"):
        saev.activations.RecordedVisionTransformer(vit, N_PATCHES, False, [3])
    rec = saev.activations.RecordedVisionTransformer(vit, N_PATCHES, True, [-1, 0])
    out, acts = rec(torch.zeros(2, 3, 160, 160))
    assert acts.shape == (2, 2, N_PATCHES + 1, D_VIT) and out.shape[0] == 2


def test_make_vit_is_the_pretrained_model(monkeypatch):
    calls = []
    monkeypatch.setattr(saev.vits, "make_vit", lambda *a, **kw: calls.append((a, kw)) or "vit")
    assert saev.activations.make_vit("clip", "ViT-B-16/openai") == "vit"
    assert calls == [(("clip", "ViT-B-16/openai"), {})]  # pretrained, saev.vits's default
