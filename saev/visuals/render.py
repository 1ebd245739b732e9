"""Heatmaps: one latent's activation over the patch grid, drawn on the image the ViT saw.

The image goes through the geometric part of the recording model's own transform (its resize
and crop, e.g. timm's crop_pct resize-then-crop or SigLIP's squash), so patch (r, c) of the
grid covers the same pixels it covered in the ViT. Only when that transform can't be rebuilt
do we fall back to the usual shorter-side resize and centre crop. Each patch's value is spread over its block of pixels (nearest neighbour, so a
patch lights exactly its own region), colour-mapped, and blended over the image with an
alpha proportional to the value: patches where the latent is silent leave the image as is.
"""

import functools
import os
import pathlib
import typing

import matplotlib
import numpy as np
from beartype import beartype
from jaxtyping import Float, UInt8, jaxtyped
from PIL import Image, ImageDraw, UnidentifiedImageError

from saev.vits import make_img_transform

MAX_ALPHA = 0.8
"""Opacity of the strongest patch, so the image stays visible under the heatmap."""


Geometry = typing.Callable[[Image.Image], Image.Image]
"""PIL image -> PIL image of the recording's `image_size`: the ViT transform before ToTensor."""

# Steps of a torchvision/open_clip/timm transform that leave PIL space: we stop there.
_TENSOR_STEPS = {"ToTensor", "MaybeToTensor", "PILToTensor", "Normalize", "ToDtype", "ToImage"}


def model_geometry(vit_family: str, vit_ckpt: str, size: tuple[int, int]) -> Geometry | None:
    """The resize/crop steps of the model's eval transform, or None if it can't be rebuilt.

    The transform is built from the architecture alone (no weights), and checked to produce
    exactly `size`; anything else (an unknown model, a transform that isn't a Compose) falls
    back to `prepare_image`'s default geometry.
    """
    try:
        transform = make_img_transform(vit_family, vit_ckpt)
    except Exception:  # noqa: BLE001 -- any failure just means "use the default geometry"
        return None
    steps = []
    for step in getattr(transform, "transforms", []):
        if type(step).__name__ in _TENSOR_STEPS:
            break
        steps.append(step)
    else:
        return None

    def geometry(img: Image.Image) -> Image.Image:
        for step in steps:
            img = step(img)
        return img

    probe = geometry(Image.new("RGB", (size[1] * 2 + 3, size[0] + 5)))
    if not isinstance(probe, Image.Image) or (probe.height, probe.width) != tuple(size):
        return None
    return geometry


def prepare_image(
    img: Image.Image, size: tuple[int, int], geometry: Geometry | None = None
) -> UInt8[np.ndarray, "h w 3"]:
    """The image as the ViT saw it, `size` (height, width), RGB uint8.

    With `geometry` (from `model_geometry`) that is the model's own resize/crop; without it,
    a shorter-side resize and centre crop.
    """
    h, w = size
    img = img.convert("RGB")
    if geometry is not None:
        return np.asarray(geometry(img).convert("RGB"), dtype=np.uint8)
    scale = max(h / img.height, w / img.width)
    new = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
    img = img.resize(new, Image.Resampling.BICUBIC)
    left, top = (new[0] - w) // 2, (new[1] - h) // 2
    return np.asarray(img.crop((left, top, left + w, top + h)), dtype=np.uint8)


def load_image(
    path: str | os.PathLike, size: tuple[int, int], geometry: Geometry | None = None
) -> UInt8[np.ndarray, "h w 3"] | None:
    """The prepared image at `path`, or None when it is missing or unreadable."""
    try:
        with Image.open(path) as img:
            return prepare_image(img, size, geometry)
    except (FileNotFoundError, IsADirectoryError, UnidentifiedImageError, OSError):
        return None


def placeholder(size: tuple[int, int]) -> UInt8[np.ndarray, "h w 3"]:
    """A grey tile with a cross and 'missing', drawn where an image could not be read."""
    h, w = size
    img = Image.new("RGB", (w, h), (200, 200, 200))
    draw = ImageDraw.Draw(img)
    draw.line((0, 0, w - 1, h - 1), fill=(150, 150, 150), width=2)
    draw.line((0, h - 1, w - 1, 0), fill=(150, 150, 150), width=2)
    draw.text((w // 2 - 20, h // 2 - 6), "missing", fill=(60, 60, 60))
    return np.asarray(img, dtype=np.uint8)


def upsample(
    grid: Float[np.ndarray, "rows cols"], size: tuple[int, int]
) -> Float[np.ndarray, "h w"]:
    """Nearest-neighbour upsampling: pixel (y, x) takes the value of the patch covering it."""
    rows, cols = grid.shape
    h, w = size
    ys = np.arange(h) * rows // h
    xs = np.arange(w) * cols // w
    return grid[ys[:, None], xs[None, :]]


@functools.cache
def _colormap(name: str):
    return matplotlib.colormaps[name]


@jaxtyped(typechecker=beartype)
def overlay(
    image: UInt8[np.ndarray, "h w 3"],
    grid: Float[np.ndarray, "rows cols"],
    vmax: float,
    *,
    cmap: str = "plasma",
) -> UInt8[np.ndarray, "h w 3"]:
    """Blend the colour-mapped `grid` (values scaled by `vmax`) over `image`."""
    h, w, _ = image.shape
    scaled = np.clip(upsample(grid.astype(np.float32), (h, w)) / max(vmax, 1e-12), 0.0, 1.0)
    colors = _colormap(cmap)(scaled)[..., :3]  # [h, w, 3] floats in [0, 1]
    alpha = (MAX_ALPHA * scaled)[..., None]
    out = image.astype(np.float32) * (1 - alpha) + colors * 255.0 * alpha
    # Exactly-zero patches keep their pixels bit for bit (no rounding drift).
    out = np.where(alpha > 0, np.rint(out), image)
    return out.astype(np.uint8)


def save_jpeg(arr: UInt8[np.ndarray, "h w 3"], path: str | os.PathLike, quality: int = 90) -> None:
    """Write `arr` as a JPEG atomically (temp name, then rename)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(arr).save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, path)
