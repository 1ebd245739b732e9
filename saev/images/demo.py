"""`images:demo`: a small synthetic dataset with planted labels, generated on first use.

Each image is a textured grey background with one shape drawn at a random position. The
labels are planted, so a probe has something real to find, plus one control:

- `colour` (red, green, blue): the shape's fill colour,
- `shape` (circle, square, triangle),
- `size` (small, large): the shape's radius,
- `noise` (a, b): drawn independently of the pixels; a correct probe stays at chance on it.

Every label is balanced and independent of the others. Generation is deterministic (same
seed -> byte-identical PNGs) and takes about a second for the default 300 images. The files
are written once under `root` (with `labels.csv` and a `manifest.json` written last, so a
half-written directory is regenerated) so `visuals` can open them by path later.
"""

import dataclasses
import json
import os
import pathlib
import shutil

import numpy as np
import PIL.Image
import PIL.ImageDraw

from saev.errors import UserError
from saev.helpers import atomic_write_json, atomic_write_text
from saev.images.common import ImageList

VERSION = 1
COLOURS = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.14, "large": 0.3}
NOISE = ("a", "b")
LABELS = ("colour", "shape", "size", "noise")


def default_root() -> pathlib.Path:
    cache = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(cache) / "saev" / "demo-images"


@dataclasses.dataclass(frozen=True)
class Demo:
    """Synthetic shapes with planted labels (colour, shape, size) and a pure-noise label; generated on first use."""

    root: pathlib.Path = dataclasses.field(default_factory=default_root)
    """Where the generated images are kept (created if missing; regenerated if its settings differ)."""
    n_imgs: int = 300
    """Number of images."""
    size: int = 64
    """Side of each square image in pixels."""
    seed: int = 0
    """Seed of the generator (same seed, same images)."""

    def load(self, *, strict: bool = False) -> ImageList:
        root = materialise(self)
        with open(root / "labels.csv", newline="", encoding="utf-8") as fd:
            lines = fd.read().splitlines()
        header, rows = lines[0].split(","), [line.split(",") for line in lines[1:]]
        paths = [r[0] for r in rows]
        labels = {name: [r[j] for r in rows] for j, name in enumerate(header) if name != "file"}
        data = {
            "kind": "demo",
            "root": str(root),
            "n_imgs": self.n_imgs,
            "size": self.size,
            "seed": self.seed,
            "version": VERSION,
        }
        return ImageList(root=root, paths=paths, labels=labels, data=data)


def manifest(cfg: Demo) -> dict:
    return {"version": VERSION, "n_imgs": cfg.n_imgs, "size": cfg.size, "seed": cfg.seed}


def materialise(cfg: Demo) -> pathlib.Path:
    """Generate the images under `cfg.root` unless an identical set is already there."""
    if cfg.n_imgs < 1 or cfg.size < 16:
        raise UserError(
            f"images:demo needs --images.n-imgs >= 1 and --images.size >= 16; got {cfg.n_imgs}, {cfg.size}."
        )
    root = pathlib.Path(cfg.root).expanduser().resolve()
    man = root / "manifest.json"
    if man.is_file():
        try:
            if json.loads(man.read_text()) == manifest(cfg):
                return root
        except json.JSONDecodeError:
            pass
    elif root.is_dir() and any(root.iterdir()) and not (root / "images").is_dir():
        raise UserError(
            f"--images.root {root} is not empty and is not a saev demo directory; pass an empty or new directory."
        )
    generate(cfg, root)
    return root


def generate(cfg: Demo, root: pathlib.Path) -> None:
    img_dir = root / "images"
    if img_dir.exists():
        shutil.rmtree(img_dir)
    (root / "manifest.json").unlink(missing_ok=True)
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(cfg.seed)
    n = cfg.n_imgs
    cols = {
        "colour": _balanced(rng, list(COLOURS), n),
        "shape": _balanced(rng, list(SHAPES), n),
        "size": _balanced(rng, list(SIZES), n),
        "noise": _balanced(rng, list(NOISE), n),
    }
    lines = ["file," + ",".join(LABELS)]
    for i in range(n):
        rel = f"images/{i:05d}.png"
        img = draw(
            np.random.default_rng([cfg.seed, i]), cfg.size, *(cols[k][i] for k in LABELS[:3])
        )
        img.save(root / rel, format="PNG")
        lines.append(rel + "," + ",".join(cols[k][i] for k in LABELS))
    atomic_write_text(root / "labels.csv", "\n".join(lines) + "\n")
    atomic_write_json(root / "manifest.json", manifest(cfg))


def _balanced(rng: np.random.Generator, values: list[str], n: int) -> list[str]:
    """Each value (almost) equally often, in a random order."""
    reps = [values[i % len(values)] for i in range(n)]
    return [reps[j] for j in rng.permutation(n)]


def draw(
    rng: np.random.Generator, size: int, colour: str, shape: str, scale: str
) -> PIL.Image.Image:
    """One image: grey texture plus a jittered shape of the given colour, kind and size."""
    bg = rng.normal(128, 22, size=(size, size, 1)).clip(0, 255)
    bg = np.repeat(bg, 3, axis=2).astype(np.uint8)
    img = PIL.Image.fromarray(bg, mode="RGB")
    r = SIZES[scale] * size * rng.uniform(0.85, 1.15)
    cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
    fill = tuple(int(np.clip(c + rng.normal(0, 15), 0, 255)) for c in COLOURS[colour])
    d = PIL.ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.886  # same area as the circle
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        t = r * 1.35
        d.polygon(
            [(cx, cy - t), (cx - t * 0.866, cy + t / 2), (cx + t * 0.866, cy + t / 2)], fill=fill
        )
    return img
