"""The shuffled loader: every train token exactly once per epoch, determinism, resume, split."""

import threading

import numpy as np
import pytest
import torch
from factories import write_shards

from saev.errors import UserError
from saev.shards import Shards, iter_images
from saev.shards.shuffled import ShuffledLoader, split_images


def make_shards(root, *, n_imgs=23, per_shard=5, layers=(1, 3), n_patches=4, d=6, dtype="float32"):
    """Tiny shards whose values encode (image, layer, token, dim), so every token is traceable."""
    img = np.arange(n_imgs)[:, None, None, None]
    lay = np.arange(len(layers))[None, :, None, None]
    tok = np.arange(n_patches + 1)[None, None, :, None]
    dim = np.arange(d)[None, None, None, :]
    acts = (img * 1000 + lay * 100 + tok * 10 + dim / 10).astype(np.float32)
    write_shards(root, acts, layers=list(layers), n_imgs_per_shard=per_shard, dtype=dtype)
    return Shards(root)


def ids(batch: torch.Tensor) -> list[tuple[int, int, int]]:
    """(image, layer position, token) of each row, decoded from make_shards' values."""
    v = batch[:, 0].round().long().tolist()
    return [(x // 1000, (x % 1000) // 100, (x % 100) // 10) for x in v]


@pytest.mark.parametrize("layers", [(1, 3), (3,)])
@pytest.mark.parametrize("tokens", ["patches", "cls", "all"])
def test_one_epoch_is_every_train_token_once(tmp_path, layers, tokens):
    shards = make_shards(tmp_path / "s", layers=layers)
    train, _ = split_images(shards.n_imgs, 0.2, seed=0)
    loader = ShuffledLoader(
        shards,
        layer=3,
        tokens=tokens,
        batch_size=7,
        imgs=train,
        seed=1,
        chunk_mb=1e-4,
        buffer_mb=3e-3,
    )
    got = [t for b in loader.batches(n_epochs=1) for t in ids(b)]
    toks = {"patches": range(1, 5), "cls": range(0, 1), "all": range(0, 5)}[tokens]
    want = sorted((int(i), layers.index(3), t) for i in train for t in toks)
    assert sorted(got) == want
    assert got != want  # shuffled
    assert loader.n_tokens == len(want)
    # Dims are intact: row = base + dim/10.
    b = next(loader.batches())
    assert torch.allclose(b - b[:, :1], torch.arange(6) / 10, atol=1e-3)


def test_deterministic_and_restartable(tmp_path):
    shards = make_shards(tmp_path / "s", layers=(3,), dtype="float16", n_imgs=9)
    kw = dict(layer=-1, batch_size=5, seed=3, chunk_mb=1e-4, buffer_mb=2e-3, n_threads=3)
    a = ShuffledLoader(shards, **kw)
    b = ShuffledLoader(shards, **kw)
    stream_a = [x for _, x in zip(range(30), a.batches(), strict=False)]  # > 3 epochs
    stream_b = [x for _, x in zip(range(30), b.batches(), strict=False)]
    assert all(torch.equal(x, y) for x, y in zip(stream_a, stream_b, strict=True))
    # Restart at batch 11: the same batches as the uninterrupted stream.
    c = ShuffledLoader(shards, **kw)
    resumed = [x for _, x in zip(range(19), c.batches(start=11 * 5), strict=False)]
    assert all(torch.equal(x, y) for x, y in zip(resumed, stream_a[11:], strict=True))
    # A different seed gives a different order.
    d = ShuffledLoader(shards, **{**kw, "seed": 4})
    assert not torch.equal(next(d.batches()), stream_a[0])


def test_split_is_disjoint_and_seeded():
    train, ev = split_images(100, 0.1, seed=0)
    assert len(ev) == 10 and len(train) == 90
    assert set(train).isdisjoint(ev) and set(train) | set(ev) == set(range(100))
    assert np.array_equal(split_images(100, 0.1, seed=0)[1], ev)
    assert not np.array_equal(split_images(100, 0.1, seed=1)[1], ev)
    assert len(split_images(3, 0.01, seed=0)[1]) == 1  # never an empty eval side
    with pytest.raises(UserError, match="eval_frac"):
        split_images(10, 1.0, seed=0)


def test_sample_and_ordered(tmp_path):
    shards = make_shards(tmp_path / "s")
    train, ev = split_images(shards.n_imgs, 0.3, seed=0)
    loader = ShuffledLoader(shards, layer=1, imgs=ev, batch_size=4, shuffle=False)
    got = [t for b in loader.batches(n_epochs=1) for t in ids(b)]
    assert got == [(int(i), 0, t) for i in ev for t in range(1, 5)]
    s = ShuffledLoader(shards, layer=1, imgs=train, batch_size=4).sample(10, seed=0)
    assert s.shape == (10, 6)
    assert {i for i, _, t in ids(s)} <= set(train.tolist())


def test_bad_layer_is_one_line(tmp_path):
    shards = make_shards(tmp_path / "s")
    with pytest.raises(UserError, match=r"layer 2 was not recorded.*\[1, 3\]"):
        ShuffledLoader(shards, layer=2, batch_size=4)


def _drain(loader, n_epochs, timeout=30.0):
    """All batches of `n_epochs`, failing (instead of hanging) if the loader stalls."""
    out: list = []
    t = threading.Thread(target=lambda: out.extend(loader.batches(n_epochs=n_epochs)), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "loader stalled"
    return out


@pytest.mark.parametrize("batch_size", [3, 10, 17, 40])
def test_batches_spanning_small_windows(tmp_path, batch_size):
    # One image per chunk and windows of about one batch: an epoch's last window is smaller
    # than a batch, so a batch can span three windows (this once deadlocked the loader).
    shards = make_shards(tmp_path / "s", layers=(3,))
    loader = ShuffledLoader(
        shards, layer=3, batch_size=batch_size, seed=2, chunk_mb=1e-4, buffer_mb=1e-5
    )
    batches = _drain(loader, n_epochs=3)
    got = sorted(t for b in batches for t in ids(b))
    assert got == sorted([(i, 0, t) for i in range(23) for t in range(1, 5)] * 3)
    assert [b.shape[0] for b in batches[:-1]] == [batch_size] * (len(batches) - 1)


def test_float16_shards_give_the_float32_stream_rounded(tmp_path):
    kw = dict(layer=3, batch_size=8, seed=5, chunk_mb=1e-4, buffer_mb=2e-3)
    s32 = make_shards(tmp_path / "a", layers=(3,))
    s16 = make_shards(tmp_path / "b", layers=(3,), dtype="float16")
    a = _drain(ShuffledLoader(s32, **kw), n_epochs=2)
    b = _drain(ShuffledLoader(s16, **kw), n_epochs=2)
    assert all(x.dtype == torch.float32 for x in b)
    assert all(torch.equal(x.half().float(), y) for x, y in zip(a, b, strict=True))


def test_held_batches_are_never_overwritten(tmp_path):
    # Batch memory is recycled once the consumer drops a batch; batches (and views of them)
    # still held must keep their values however far the stream goes on.
    shards = make_shards(tmp_path / "s", layers=(3,))
    loader = ShuffledLoader(shards, layer=3, batch_size=6, seed=0, chunk_mb=1e-4, buffer_mb=1e-3)
    held, copies = [], []
    for i, x in zip(range(200), loader.batches(), strict=False):
        if i % 7 == 0:
            held.append(x[:, :3] if i % 2 else x)
            copies.append(held[-1].clone())
    assert all(torch.equal(h, c) for h, c in zip(held, copies, strict=True))
    # The kept window buffers give the same stream on a second pass.
    first = [x.clone() for x in loader.batches(n_epochs=1)]
    again = list(loader.batches(n_epochs=1))
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))


def poison(root, md, img, layer_pos, token, dim, value) -> None:
    """Overwrite one stored value of a shard directory (as a damaged recording would hold)."""
    shard_i, row = divmod(img, md.n_imgs_per_shard)
    acts = np.memmap(
        root / md.shard_file(shard_i),
        mode="r+",
        dtype=md.np_dtype,
        shape=(md.n_imgs_in(shard_i), *md.img_shape),
    )
    acts[row, layer_pos, token, dim] = value
    acts.flush()


@pytest.mark.parametrize(
    ("dtype", "value", "why"),
    [
        (
            "float32",
            np.nan,
            "re-record it with `saev activations` (the ViT gave it, or the file is damaged)",
        ),
        ("float16", -np.inf, "float16 overflowed while recording: re-record with --dtype float32"),
    ],
)
def test_nonfinite_activation_stops_every_loader_with_one_line(tmp_path, dtype, value, why):
    shards = make_shards(tmp_path / "s", dtype=dtype)
    poison(tmp_path / "s", shards.md, img=7, layer_pos=1, token=2, dim=4, value=value)
    shards = Shards(tmp_path / "s")  # opening does not read the data
    want = (
        f"{tmp_path / 's' / 'acts000001.bin'}: activation {float(value)} at image 7, layer 3, "
        f"token 2, dim 4 is not finite; {why}."
    )
    kw = dict(layer=3, batch_size=7, chunk_mb=1e-4, buffer_mb=3e-3, n_threads=2)
    for loader in (ShuffledLoader(shards, **kw), ShuffledLoader(shards, shuffle=False, **kw)):
        with pytest.raises(UserError) as err:
            _drain_raising(loader)
        assert str(err.value) == want
    with pytest.raises(UserError) as err:
        ShuffledLoader(shards, **kw).sample(10**6)
    assert str(err.value) == want
    with pytest.raises(UserError) as err:
        list(iter_images(shards, 3, batch_size=4))
    assert str(err.value) == want
    # The other layer and images without it are fine; so is a split that leaves image 7 out.
    assert sum(len(i) for i, _ in iter_images(shards, 1, batch_size=4)) == 23
    imgs = np.array([i for i in range(shards.n_imgs) if i != 7])
    assert len(_drain(ShuffledLoader(shards, imgs=imgs, **kw), n_epochs=1)) > 0


def _drain_raising(loader):
    """Run one epoch in this thread (the loader's own threads must hand errors over)."""
    for _ in loader.batches(n_epochs=1):
        pass


def test_train_stops_on_nonfinite_shards_with_one_line(tmp_path, capsys):
    from saev.__main__ import run

    shards = make_shards(tmp_path / "s", layers=(3,), n_patches=16, d=8, n_imgs=40, per_shard=8)
    poison(tmp_path / "s", shards.md, img=21, layer_pos=0, token=5, dim=0, value=np.inf)
    argv = ["train", "--data.shard-root", str(tmp_path / "s"), "--data.layer", "3"]
    argv += ["--sae.family", "topk", "--sae.exp-factor", "2", "--sae.k", "2", "--n-train", "2048"]
    argv += ["--data.batch-size", "64", "--run-root", str(tmp_path / "runs"), "--device", "cpu"]
    assert run([*argv, "--n-init-sample", "64"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {tmp_path / 's' / 'acts000002.bin'}: activation inf at image 21, layer 3, "
        "token 5, dim 0 is not finite; re-record it with `saev activations` (the ViT gave it, "
        "or the file is damaged).\n"
    )
