"""saev.visuals: streaming top-k, latent selection and heatmap geometry (no shards, no browser)."""

import math
import tracemalloc

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from saev.errors import UserError
from saev.visuals import render, topk
from saev.visuals.main import select_latents


def brute_force(codes: np.ndarray, img_ids: np.ndarray, top_n: int):
    """Top images per latent by exhaustive sort: (value desc, image asc), only values > 0."""
    n_imgs, n_patches, d_sae = codes.shape
    best = codes.max(axis=1)  # [n_imgs, d_sae]
    values = np.full((d_sae, top_n), -np.inf, dtype=np.float32)
    images = np.full((d_sae, top_n), -1, dtype=np.int64)
    for j in range(d_sae):
        hits = sorted((-best[i, j], img_ids[i]) for i in range(n_imgs) if best[i, j] > 0)[:top_n]
        for r, (neg, img) in enumerate(hits):
            values[j, r], images[j, r] = -neg, img
    return values, images


def make_codes(n_imgs: int, n_patches: int, d_sae: int, seed: int) -> np.ndarray:
    """Sparse codes from a few distinct values (many ties), with some latents that never fire."""
    rng = np.random.default_rng(seed)
    levels = np.array([0.5, 1.0, 2.0], dtype=np.float32)
    codes = levels[rng.integers(0, 3, size=(n_imgs, n_patches, d_sae))]
    codes *= rng.random((n_imgs, n_patches, d_sae)) < 0.15
    codes[:, :, [0, d_sae - 1]] = 0.0  # never fire
    codes[:, :, 1] = 1.0  # fires everywhere at one value: a tie across every image
    return codes


def batches_of(codes: np.ndarray, order: np.ndarray, batch_size: int):
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        yield torch.from_numpy(idx), torch.from_numpy(codes[idx])


@pytest.mark.parametrize("batch_size", [1, 4, 9, 40])
@pytest.mark.parametrize("shuffled", [False, True])
def test_streaming_topk_equals_brute_force(batch_size, shuffled):
    n_imgs, n_patches, d_sae, top_n = 37, 5, 11, 6
    codes = make_codes(n_imgs, n_patches, d_sae, seed=batch_size)
    order = np.arange(n_imgs)
    if shuffled:
        order = np.random.default_rng(0).permutation(n_imgs)
    # The identity encoder: the "activations" are the codes themselves.
    res = topk.run_pass(
        batches_of(codes, order, batch_size), lambda x: x, d_sae=d_sae, top_n=top_n, n_imgs=n_imgs
    )
    want_v, want_i = brute_force(codes, np.arange(n_imgs), top_n)
    np.testing.assert_array_equal(res.images, want_i)
    np.testing.assert_array_equal(res.values, want_v)

    flat = codes.reshape(-1, d_sae)
    np.testing.assert_array_equal(res.count, (flat != 0).sum(0))
    np.testing.assert_allclose(res.total, flat.astype(np.float64).sum(0))
    np.testing.assert_array_equal(res.max, flat.max(0))
    assert (res.n_imgs, res.n_tokens) == (n_imgs, n_imgs * n_patches)
    # Never-firing latents: empty lists, zero stats.
    for j in (0, d_sae - 1):
        assert (res.images[j] == -1).all() and np.isneginf(res.values[j]).all()
        assert res.freq[j] == 0 and res.mean[j] == 0 and res.max[j] == 0
    # The all-tie latent keeps the lowest image ids.
    np.testing.assert_array_equal(res.images[1], np.arange(top_n))
    assert res.freq[1] == 1.0 and res.mean[1] == 1.0


def test_fewer_firing_images_than_top_n_leave_empty_slots():
    codes = np.zeros((5, 2, 3), dtype=np.float32)
    codes[3, 1, 2] = 4.0
    codes[1, 0, 2] = 4.0
    res = topk.run_pass(batches_of(codes, np.arange(5), 2), lambda x: x, d_sae=3, top_n=4)
    assert res.images[2].tolist() == [1, 3, -1, -1]
    assert res.values[2, :2].tolist() == [4.0, 4.0] and np.isneginf(res.values[2, 2:]).all()
    assert res.mean[2] == 4.0 and res.freq[2] == pytest.approx(2 / 10)


def test_truncate_and_tensor_round_trip():
    codes = make_codes(12, 3, 4, seed=1)
    res = topk.run_pass(batches_of(codes, np.arange(12), 5), lambda x: x, d_sae=4, top_n=5)
    back = topk.TopKResult.from_tensors(res.to_tensors())
    np.testing.assert_array_equal(back.images, res.images)
    assert (back.n_tokens, back.n_imgs) == (36, 12)
    small = res.truncate(2)
    np.testing.assert_array_equal(small.images, res.images[:, :2])
    np.testing.assert_array_equal(
        small.images,
        topk.run_pass(batches_of(codes, np.arange(12), 5), lambda x: x, d_sae=4, top_n=2).images,
    )


def _pass_footprint(n_imgs: int, d_vit: int = 16, d_sae: int = 256, top_n: int = 8):
    """State bytes and Python-heap peak of a pass over `n_imgs` generated images."""
    w = torch.randn(d_vit, d_sae, generator=torch.Generator().manual_seed(0))

    def batches():
        gen = torch.Generator().manual_seed(1)
        for s in range(0, n_imgs, 10):
            yield torch.arange(s, s + 10), torch.randn(10, 4, d_vit, generator=gen)

    acc = topk.TopKAccumulator(d_sae, top_n)
    tracemalloc.start()
    for img_i, acts in batches():
        acc.update(img_i, topk.encode_patches(lambda x: torch.relu(x @ w), acts))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return acc.state_nbytes(), peak, acc


def test_pass_memory_does_not_grow_with_images():
    small_bytes, small_peak, small = _pass_footprint(20)
    big_bytes, big_peak, big = _pass_footprint(200)
    assert big.n_imgs == 10 * small.n_imgs
    # The state between batches is O(d_sae * top_n), the same for 10x more images.
    assert small_bytes == big_bytes == 256 * 8 * (4 + 8) + 256 * (8 + 8 + 4)
    for t in (big.values, big.images):
        assert tuple(t.shape) == (256, 8)
    # Nothing on the Python heap grows per image either.
    assert big_peak < 1.5 * small_peak + 64 * 1024


# Selecting latents


def _result(freq, mean, top_n=2, n_tokens=10**6):
    count = np.round(np.asarray(freq) * n_tokens).astype(np.int64)
    d = len(count)
    return topk.TopKResult(
        values=np.ones((d, top_n), np.float32),
        images=np.zeros((d, top_n), np.int64),
        count=count,
        total=count * np.asarray(mean, dtype=np.float64),
        max=np.asarray(mean, dtype=np.float32) * 2,
        n_tokens=n_tokens,
        n_imgs=100,
    )


def test_select_latents_by_ranges_include_and_pick():
    #            0     1     2     3     4     5
    freq = [1e-3, 1e-1, 1e-4, 0.0, 1e-3, 1e-5]
    mean = [1.0, 1.0, 100.0, 0.0, 5.0, 0.5]
    res = _result(freq, mean)
    kw = dict(log_freq_range=(-6, -2), log_value_range=(-1, 1))
    assert select_latents(res, n_latents=10, **kw).tolist() == [0, 4, 5]
    assert select_latents(res, n_latents=10, include=(3, 1), **kw).tolist() == [0, 1, 3, 4, 5]
    assert select_latents(res, n_latents=1, pick="freq", **kw).tolist() == [0]
    assert select_latents(res, n_latents=1, pick="mean", **kw).tolist() == [4]
    assert select_latents(res, n_latents=2, pick="random", seed=3, **kw).tolist() == (
        select_latents(res, n_latents=2, pick="random", seed=3, **kw).tolist()
    )
    assert len(select_latents(res, n_latents=2, **kw)) == 2


def test_select_latents_empty_and_out_of_range_messages():
    res = _result([1e-3, 0.0], [1.0, 0.0])
    with pytest.raises(
        UserError, match=r"^no latent passes --log-freq-range -9 -8 .*1 of 2 latents fire"
    ):
        select_latents(res, log_freq_range=(-9, -8), log_value_range=(-1, 1), n_latents=5)
    with pytest.raises(
        UserError, match=r"--include-latents 7 is out of range; the SAE has 2 latents"
    ):
        select_latents(
            res, log_freq_range=(-6, -2), log_value_range=(-1, 1), n_latents=5, include=(7,)
        )


# Heatmaps


@pytest.mark.parametrize(
    ("size", "grid", "patch"),
    [((224, 224), (14, 14), (3, 9)), ((30, 45), (3, 5), (2, 4)), ((32, 32), (4, 4), (0, 0))],
)
def test_heatmap_lights_exactly_the_firing_patch(size, grid, patch):
    h, w = size
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    values = np.zeros(grid, dtype=np.float32)
    values[patch] = 3.0
    out = render.overlay(image, values, vmax=3.0)
    changed = (out != image).any(axis=2)
    r, c = patch
    y0, y1 = math.ceil(r * h / grid[0]), math.ceil((r + 1) * h / grid[0])
    x0, x1 = math.ceil(c * w / grid[1]), math.ceil((c + 1) * w / grid[1])
    want = np.zeros((h, w), dtype=bool)
    want[y0:y1, x0:x1] = True
    np.testing.assert_array_equal(changed, want)
    # Alpha by value: the blend weight is MAX_ALPHA * value / vmax, the colour cmap(value / vmax).
    for v in (3.0, 1.5):
        got = render.overlay(image, values * (v / 3.0), vmax=3.0)[want].astype(float)
        a = render.MAX_ALPHA * v / 3.0
        colour = np.array(matplotlib.colormaps["plasma"](v / 3.0)[:3]) * 255.0
        np.testing.assert_allclose(got, image[want] * (1 - a) + colour * a, atol=0.51)


def test_prepare_image_resizes_and_centre_crops():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 50, 100))  # a red left quarter is cropped away
    arr = render.prepare_image(img, (32, 32))
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    assert arr[:, :, 0].max() < 30


def test_placeholder_and_missing_image(tmp_path):
    assert render.load_image(tmp_path / "nope.jpg", (16, 16)) is None
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    assert render.load_image(tmp_path / "bad.jpg", (16, 16)) is None
    assert render.placeholder((16, 24)).shape == (16, 24, 3)


def test_model_geometry_follows_the_recording_transform():
    # timm's eval transform for test_vit resizes to 168 and centre-crops 160 (crop_pct), so a
    # band of 4 px on each side of a 168 px image is not what the ViT saw.
    geometry = render.model_geometry("timm", "test_vit", (160, 160))
    assert geometry is not None
    img = Image.new("RGB", (168, 168), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 4, 168))  # a red band the crop removes
    arr = render.prepare_image(img, (160, 160), geometry)
    assert arr.shape == (160, 160, 3)
    assert arr[:, :, 0].max() < 30
    # Without the model's geometry the red band would be kept.
    assert render.prepare_image(img, (160, 160))[:, 0, 0].min() > 200
    # An architecture that can't be rebuilt falls back to the default geometry.
    assert render.model_geometry("timm", "no_such_model_xyz", (160, 160)) is None
