"""The test suite's builders of shard folders and image folders, so each test says only what it
varies (the activations, a metadata key, the file layout) and every folder is built one way.

Shard folders are written by saev's own `ShardWriter`, from activations the test chooses;
saev 0.1's format is tests/saev01.py's. Images are small solid-colour files (PNG or JPEG, by
extension) that every `saev.images` source reads.
"""

import pathlib
import typing

import numpy as np
import PIL.Image
import pytest
import torch
from jaxtyping import Float

from saev.shards import Metadata, ShardWriter

METADATA = dict(
    vit_family="timm",
    vit_ckpt="tiny",
    layers=[2, 3],
    n_blocks=4,
    n_patches_per_img=4,
    cls_token=True,
    d_vit=8,
    n_imgs=10,
    n_imgs_per_shard=4,
    data={"kind": "test"},
)
"""A recording of a tiny 4-block timm ViT: what `metadata` fills in for every key not given."""

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]
"""`@pytest.mark.parametrize("device", DEVICES)`: a test of the sparse kernels runs on the CPU
everywhere and on CUDA (cuSPARSE, CUDA's embedding bags) where torch sees a GPU; CI has none."""


def metadata(**fields: typing.Any) -> Metadata:
    """`Metadata` of a synthetic recording: `METADATA`, overridden by `fields`."""
    return Metadata(**{**METADATA, **fields})


def write_shards(
    root: pathlib.Path,
    acts: Float[np.ndarray, "n_imgs n_layers n_tokens d_vit"],
    *,
    rows: list[dict] | None = None,
    **fields: typing.Any,
) -> Metadata:
    """Write `acts` as a shard folder at `root` and return its metadata.

    The shape of `acts` gives `n_imgs`, `d_vit`, `n_patches_per_img` (tokens less the CLS
    token) and, unless given, `layers` (the last blocks of the ViT) and `n_imgs_per_shard`
    (all in one shard); `fields` sets any other key of `metadata`. `rows` become images.csv.
    """
    n_imgs, n_layers, n_tokens, d_vit = acts.shape
    cls_token = fields.get("cls_token", METADATA["cls_token"])
    n_blocks = fields.get("n_blocks", METADATA["n_blocks"])
    shape = dict(
        n_imgs=n_imgs,
        d_vit=d_vit,
        n_patches_per_img=n_tokens - int(cls_token),
        layers=list(range(n_blocks - n_layers, n_blocks)),
        n_imgs_per_shard=n_imgs,
    )
    md = metadata(**{**shape, **fields})
    with ShardWriter(root, md) as writer:
        writer.write(acts, rows=rows)
    return md


def tiny_shards(
    root: pathlib.Path, *, d: int = 16, n_imgs: int = 48, seed: int = 0
) -> pathlib.Path:
    """Shards to train on: 2 layers of 16 patches + CLS, each token a sparse sum of a few of
    4*d random directions plus noise (something an SAE can learn). Returns `root`."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(4 * d, d))
    codes = rng.exponential(size=(n_imgs, 2, 17, 4 * d)) * (
        rng.random((n_imgs, 2, 17, 4 * d)) < 0.05
    )
    acts = codes @ atoms + 0.05 * rng.normal(size=(n_imgs, 2, 17, d)) + 3.0
    write_shards(root, acts.astype(np.float32), n_imgs_per_shard=20)
    return root


def make_images(
    root: pathlib.Path,
    paths: typing.Sequence[str],
    *,
    colours: typing.Sequence[tuple[int, int, int]] | None = None,
    size: tuple[int, int] = (32, 32),
    noise: int = 0,
    rng: np.random.Generator | None = None,
) -> pathlib.Path:
    """Write one RGB image of `size` (width, height) at each relative path under `root`
    (folders made) and return `root`.

    Image i is `colours[i]` (default: a different colour per i); `noise` > 0 adds integer
    noise in [-noise, noise) to every pixel, drawn from `rng` in path order.
    """
    root = pathlib.Path(root)
    width, height = size
    for i, rel in enumerate(paths):
        colour = colours[i] if colours is not None else ((20 * i) % 256, 100, (255 - 20 * i) % 256)
        pixels = np.broadcast_to(np.array(colour), (height, width, 3))
        if noise:
            assert rng is not None, "noise needs an rng"
            pixels = np.clip(pixels + rng.integers(-noise, noise, (height, width, 3)), 0, 255)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(pixels.astype(np.uint8)).save(root / rel)
    return root
