"""saev.vits: backbones (timm, dinov2 with registers, open_clip) and the recorder."""

import json

import pytest
import torch
from torch import nn

import saev.vits
from saev.errors import UserError
from saev.vits import Recorder, make_img_transform, make_vit

TINY_CLIP = "saev-test-tiny-clip"


@pytest.fixture(scope="module")
def tiny_clip_config(tmp_path_factory):
    """A tiny open_clip architecture: 32 px, 8 px patches (4x4 grid), width 32, 3 blocks."""
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 3,
            "width": 32,
            "patch_size": 8,
            "head_width": 16,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1},
    }
    path = tmp_path_factory.mktemp("oc") / f"{TINY_CLIP}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return TINY_CLIP


class ZeroAttn(nn.Module):
    """Replaces attention so each token's block output depends on that token alone."""

    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)


def vits(tiny_clip_config):
    yield make_vit("timm", "test_vit", pretrained=False)  # CLS, no registers
    yield make_vit("timm", "test_vit2", pretrained=False)  # 1 register, no CLS
    yield make_vit("dinov2", "dinov2_vits14_reg", pretrained=False, img_size=28, depth=2)
    yield make_vit("clip", tiny_clip_config, pretrained=False)


def test_facts_are_read_from_the_model(tiny_clip_config):
    facts = [
        (v.n_blocks, v.d_vit, v.patch_grid, v.cls_token, v.n_prefix, v.image_size)
        for v in vits(tiny_clip_config)
    ]
    assert facts == [
        (6, 64, (10, 10), True, 1, (160, 160)),
        (8, 64, (10, 10), False, 1, (160, 160)),
        (2, 384, (2, 2), True, 5, (28, 28)),
        (3, 32, (4, 4), True, 1, (32, 32)),
    ]


def test_recorded_values_equal_a_manual_forward(tiny_clip_config):
    torch.manual_seed(0)
    for vit in vits(tiny_clip_config):
        captured = {}
        handles = [
            b.register_forward_hook(lambda m, a, o, i=i, c=captured: c.__setitem__(i, o.clone()))
            for i, b in enumerate(vit.blocks)
        ]
        imgs = torch.randn(2, 3, *vit.image_size)
        expected_out = vit(imgs)
        for h in handles:
            h.remove()
        rec = Recorder(vit, [-1, 0])
        out, acts = rec(imgs)
        torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
        n_tok = vit.n_patches + int(vit.cls_token)
        assert acts.shape == (2, 2, n_tok, vit.d_vit)
        for pos, layer in enumerate([vit.n_blocks - 1, 0]):
            full = captured[layer]
            want = full[:, vit.n_prefix :]
            if vit.cls_token:
                want = torch.cat([full[:, :1], want], dim=1)  # CLS first, registers dropped
            assert torch.equal(acts[:, pos], want)
        # record() stops after the deepest block and gives the same values.
        assert torch.equal(rec.record(imgs), acts)
        rec.remove()


@pytest.mark.parametrize("which", ["timm", "clip"])
def test_patches_are_row_major(tiny_clip_config, which):
    """With attention zeroed, changing image patch (r, c) changes only token 1 + r*cols + c."""
    if which == "timm":
        vit = make_vit("timm", "test_vit", pretrained=False)
        vit.blocks[0].attn = ZeroAttn()
    else:
        vit = make_vit("clip", tiny_clip_config, pretrained=False)
        vit.blocks[0].attention = lambda q_x, **kw: torch.zeros_like(q_x)
    rows, cols = vit.patch_grid
    p = vit.image_size[0] // rows
    rec = Recorder(vit, [0])
    imgs = torch.randn(1, 3, *vit.image_size)
    base = rec.record(imgs)[0, 0]
    r, c = rows - 1, 1
    imgs2 = imgs.clone()
    imgs2[..., r * p : (r + 1) * p, c * p : (c + 1) * p] += 1.0
    changed = (rec.record(imgs2)[0, 0] != base).any(dim=-1).nonzero().flatten().tolist()
    assert changed == [1 + r * cols + c]


def test_layers_resolve_and_fail_clearly():
    vit = make_vit("timm", "test_vit", pretrained=False)
    assert vit.resolve_layers([-2, 0, 5]) == [4, 0, 5]
    with pytest.raises(
        UserError, match=r"--vit-layers 6 is out of range .* 6 blocks \(valid: -6..5\)"
    ):
        Recorder(vit, [6])
    with pytest.raises(UserError, match="same block twice"):
        vit.resolve_layers([-1, 5])


def test_bad_names_and_offline_weights_fail_in_one_line():
    cases = [
        (
            ("clip", "ViT-B-33/openai"),
            "open_clip has no architecture 'ViT-B-33'; did you mean ViT-B-32",
        ),
        (("clip", "ViT-B-32/nope"), "'nope' is neither a pretrained tag of ViT-B-32"),
        (("clip", "ViT-B-32"), "expected ARCH/pretrained-tag"),
        (("timm", "vit_tinyy_patch16_224"), "timm has no model 'vit_tinyy_patch16_224'"),
        (("timm", "test_vit/missing.safetensors"), "weights file"),
        (("timm", "vit_tiny_patch16_224"), "HF_HUB_OFFLINE=1 forbids downloading"),
        (("clip", "ViT-B-32/openai"), "HF_HUB_OFFLINE=1 forbids downloading"),
        (("resnet", "x"), "--vit-family 'resnet' is unknown"),
    ]
    for (family, ckpt), match in cases:
        with pytest.raises(UserError, match=match) as info:
            make_vit(family, ckpt)
        assert "\n" not in str(info.value)


def test_local_weights_file(tmp_path):
    from safetensors.torch import save_file

    src = make_vit("timm", "test_vit", pretrained=False)
    path = tmp_path / "w.safetensors"
    save_file(src.model.state_dict(), str(path))
    vit = make_vit("timm", f"test_vit/{path}")
    assert vit.pretrained
    for a, b in zip(vit.model.state_dict().values(), src.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_image_transform(tiny_clip_config):
    from PIL import Image

    img = Image.new("RGB", (50, 70), (255, 0, 0))
    assert make_img_transform("timm", "test_vit")(img).shape == (3, 160, 160)
    x = make_img_transform("clip", tiny_clip_config)(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert saev.vits.DINOV2_ALIASES["dinov2_vitb14_reg"] == "vit_base_patch14_reg4_dinov2.lvd142m"


def test_splice_identity_is_bit_identical_and_sees_the_recorded_layout(tiny_clip_config):
    """fn gets exactly what Recorder stores; returning it unchanged changes nothing."""
    torch.manual_seed(0)
    for vit in vits(tiny_clip_config):
        imgs = torch.randn(1, 3, *vit.image_size)
        layer = vit.n_blocks - 2
        rec = Recorder(vit, [layer])
        expected, stored = rec(imgs)
        rec.remove()
        seen = []

        def keep(x, seen=seen):
            seen.append(x.clone())
            return x

        with saev.vits.splice(vit, layer, keep):
            out = vit(imgs)
        assert torch.equal(out, expected)
        assert torch.equal(seen[0], stored[:, 0])
        assert not vit.blocks[layer]._forward_hooks  # the hook is gone after the block


def test_splice_replaces_cls_and_patches_and_leaves_registers(tiny_clip_config):
    """What the next block receives: fn's values at CLS and patches, the registers as they were."""
    torch.manual_seed(0)
    for vit in vits(tiny_clip_config):
        imgs = torch.randn(1, 3, *vit.image_size)
        layer = 0
        clean, spliced = {}, {}

        def grab(into, batch_first=vit.batch_first):
            def hook(module, args, output):
                x = output if batch_first else output.transpose(0, 1)
                into["x"] = x.clone()

            return hook

        h = vit.blocks[layer].register_forward_hook(grab(clean))
        clean_out = vit(imgs)
        h.remove()
        with saev.vits.splice(vit, layer, lambda x: torch.full_like(x, 7.0)):
            h = vit.blocks[layer].register_forward_hook(grab(spliced))  # runs after the splice
            out = vit(imgs)
            h.remove()
        got, want = spliced["x"], clean["x"]
        n_prefix = vit.n_prefix
        assert bool((got[:, n_prefix:] == 7.0).all())
        assert bool((got[:, 0] == 7.0).all()) == vit.cls_token
        registers = slice(int(vit.cls_token), n_prefix)
        assert torch.equal(got[:, registers], want[:, registers])
        assert not torch.equal(out, clean_out)


def test_splice_rejects_a_wrong_shape():
    vit = make_vit("timm", "test_vit", pretrained=False)
    with saev.vits.splice(vit, 1, lambda x: x[:, 1:]), pytest.raises(ValueError, match="expected"):
        vit(torch.randn(1, 3, *vit.image_size))


def test_head_is_kept_apart_and_the_trunk_is_unchanged(tiny_clip_config):
    """head=True adds the classifier without touching the trunk's (seeded) random weights."""
    torch.manual_seed(42)
    plain = make_vit("timm", "test_vit", pretrained=False)
    rng = torch.get_rng_state()
    vit = saev.vits.make_recorded_vit("timm", "test_vit", pretrained=False, seed=42, head=True)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    for a, b in zip(
        vit.model.state_dict().values(), plain.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    again = saev.vits.make_recorded_vit("timm", "test_vit", pretrained=False, seed=42, head=True)
    assert torch.equal(vit.head.weight, again.head.weight)
    imgs = torch.randn(2, 3, *vit.image_size)
    emb = vit(imgs)
    assert torch.equal(emb, plain(imgs)) and vit.head(emb).shape == (2, 1000)
    other = saev.vits.make_recorded_vit("timm", "test_vit", pretrained=False, seed=43)
    assert not torch.equal(other.model.cls_token, plain.model.cls_token)
    assert make_vit("clip", tiny_clip_config, pretrained=False, head=True).head is None
    assert make_vit("timm", "test_vit", pretrained=False).head is None


def test_pretrained_head_comes_from_the_weights_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    full = timm.create_model("test_vit")
    path = tmp_path / "w.safetensors"
    save_file(full.state_dict(), str(path))
    vit = make_vit("timm", f"test_vit/{path}", head=True)
    assert torch.equal(vit.head.weight, full.head.weight)
    imgs = torch.randn(1, 3, *vit.image_size)
    torch.testing.assert_close(vit.head(vit(imgs)), full(imgs), rtol=0, atol=0)
    # A file without a classifier (saved from a num_classes=0 model) still loads, head None.
    trunk = tmp_path / "trunk.safetensors"
    save_file(make_vit("timm", f"test_vit/{path}").model.state_dict(), str(trunk))
    assert make_vit("timm", f"test_vit/{trunk}", head=True).head is None
