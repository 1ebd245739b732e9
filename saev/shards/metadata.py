"""`metadata.json`: what a shard directory holds, enough to read it without the images.

The same class reads directories written by the reference saev 0.1, whose metadata has no
`protocol` key, stores `n_patches_per_shard` instead of images per shard, always has a CLS
token, is float32 and pads the last shard to full size. Those are mapped onto today's fields
and marked `protocol == LEGACY`, which is how the readers know the shard files are padded.
"""

import dataclasses
import json
import math
import os
import pathlib
import typing

import numpy as np

from saev.errors import UserError
from saev.helpers import atomic_write_json

PROTOCOL = "saev-shards/2"
"""Format version written by this saev."""
LEGACY = "saev-0.1"
"""Protocol given to directories written by the reference saev 0.1 (no `protocol` key)."""

DTYPES = ("float32", "float16")


@dataclasses.dataclass(frozen=True)
class Metadata:
    """Every key of `metadata.json` (docs/formats.md)."""

    vit_family: str
    """Backbone family: clip, siglip, dinov2 or timm."""
    vit_ckpt: str
    """Checkpoint as the user named it (open_clip `ARCH/tag`, `hf-hub:...`, timm name, or a file)."""
    layers: list[int]
    """Recorded block indices, resolved to >= 0, in the order of the layer axis of the shards."""
    n_blocks: int
    """Depth of the ViT (number of transformer blocks); 0 when unknown (reference saev 0.1)."""
    n_patches_per_img: int
    """Patch tokens per image (registers are never stored)."""
    cls_token: bool
    """Whether token 0 of each image is the CLS token."""
    d_vit: int
    """Width of the residual stream."""
    n_imgs: int
    """Images in the whole recording."""
    n_imgs_per_shard: int
    """Images per shard file; the last shard holds the remainder."""
    dtype: str = "float32"
    """Stored dtype: float32 or float16."""
    image_size: tuple[int, int] = (224, 224)
    """(height, width) of the images fed to the ViT."""
    patch_grid: tuple[int, int] | None = None
    """(rows, cols) of the patch grid; filled in as a square grid when not given."""
    data: dict = dataclasses.field(default_factory=dict)
    """JSON description of the image dataset (kind, root, split, ...)."""
    seed: int = 0
    """Seed of the recording."""
    pretrained: bool = True
    """False when the ViT had random weights (--random-weights)."""
    fingerprint: dict | None = None
    """The recorded dataset: `n_files`, `files` (sha256 of each image's path and size, in
    index order) and `labels` (sha256 of the label columns). None in recordings made before
    saev kept it, and in synthetic shards; not part of the directory name."""
    protocol: str = PROTOCOL
    """Format version; LEGACY for reference saev 0.1 directories."""

    def __post_init__(self):
        # Normalise types so equality and JSON round trips do not depend on list vs tuple.
        object.__setattr__(self, "layers", [int(x) for x in self.layers])
        object.__setattr__(self, "image_size", tuple(int(x) for x in self.image_size))
        if self.patch_grid is None:
            side = math.isqrt(self.n_patches_per_img)
            grid = (
                (side, side)
                if side * side == self.n_patches_per_img
                else (1, self.n_patches_per_img)
            )
            object.__setattr__(self, "patch_grid", grid)
        else:
            object.__setattr__(self, "patch_grid", tuple(int(x) for x in self.patch_grid))
        if self.dtype not in DTYPES:
            raise UserError(f"metadata dtype {self.dtype!r} is not one of {', '.join(DTYPES)}.")
        rows, cols = self.patch_grid
        if rows * cols != self.n_patches_per_img:
            raise UserError(
                f"metadata patch_grid {list(self.patch_grid)} does not multiply to "
                f"n_patches_per_img={self.n_patches_per_img}."
            )
        if not self.layers:
            raise UserError("metadata layers is empty; expected at least one recorded block.")
        for key in ("n_imgs_per_shard", "d_vit"):
            if getattr(self, key) < 1:
                raise UserError(f"metadata {key}={getattr(self, key)} must be >= 1.")
        if self.n_imgs < 0:
            raise UserError(f"metadata n_imgs={self.n_imgs} must be >= 0.")

    # Derived sizes.

    @property
    def n_tokens_per_img(self) -> int:
        return self.n_patches_per_img + int(self.cls_token)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_imgs / self.n_imgs_per_shard)

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def img_shape(self) -> tuple[int, int, int]:
        """Shape of one image's activations: [n_layers, n_tokens, d_vit]."""
        return (self.n_layers, self.n_tokens_per_img, self.d_vit)

    @property
    def bytes_per_img(self) -> int:
        return math.prod(self.img_shape) * self.np_dtype.itemsize

    @property
    def padded(self) -> bool:
        """Reference saev 0.1 wrote every shard at full size, the last one padded."""
        return self.protocol == LEGACY

    def n_imgs_in(self, shard_i: int) -> int:
        """Images held by shard `shard_i` (the last shard holds the remainder)."""
        if not 0 <= shard_i < self.n_shards:
            raise IndexError(f"shard {shard_i} out of range [0, {self.n_shards})")
        return min(self.n_imgs_per_shard, self.n_imgs - shard_i * self.n_imgs_per_shard)

    def shard_file(self, shard_i: int) -> str:
        return f"acts{shard_i:06d}.bin"

    def resolve_layer(self, layer: int) -> int:
        """A block index as stored in `layers`: negative indices count from `n_blocks`."""
        if layer < 0 and self.n_blocks > 0:
            return self.n_blocks + layer
        return layer

    # JSON.

    def to_json(self) -> dict[str, typing.Any]:
        dct = dataclasses.asdict(self)
        dct["image_size"] = list(self.image_size)
        dct["patch_grid"] = list(self.patch_grid)
        if self.fingerprint is None:  # as written before saev kept fingerprints
            del dct["fingerprint"]
        return dct

    @classmethod
    def from_json(cls, dct: dict[str, typing.Any], *, source: str = "metadata.json") -> "Metadata":
        """Build from a parsed metadata.json (ours or the reference saev 0.1's)."""
        if not isinstance(dct, dict):
            raise UserError(f"{source}: expected a JSON object, got {type(dct).__name__}.")
        if "protocol" not in dct:
            return cls._from_legacy(dct, source)
        if dct["protocol"] != PROTOCOL:
            raise UserError(
                f"{source}: protocol {dct['protocol']!r} is not supported; expected {PROTOCOL!r}."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(dct) - names)
        if unknown:
            raise UserError(f"{source}: unknown keys {unknown}; expected only {sorted(names)}.")
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if k not in dct]
        if missing:
            raise UserError(f"{source}: missing keys {missing}.")
        try:
            return cls(**dct)
        except (TypeError, ValueError, UserError) as err:
            raise UserError(f"{source}: {err}") from err

    @classmethod
    def _from_legacy(cls, dct: dict[str, typing.Any], source: str) -> "Metadata":
        # saev 0.1 used vit_family/vit_ckpt; some earlier versions model_org/model_ckpt.
        try:
            family = dct.get("vit_family", dct.get("model_org"))
            ckpt = dct.get("vit_ckpt", dct.get("model_ckpt"))
            layers = [int(x) for x in dct["layers"]]
            n_patches = int(dct["n_patches_per_img"])
            per_shard = dct.get("n_patches_per_shard", dct.get("max_patches_per_shard"))
            cls_token = bool(dct.get("cls_token", True))
            # saev 0.1 (`n_patches_per_shard`) always reserved a CLS slot per image; later
            # reference versions (`max_patches_per_shard`) count a CLS slot only when present.
            slots = n_patches + (1 if "n_patches_per_shard" in dct else int(cls_token))
            n_imgs_per_shard = int(per_shard) // len(layers) // slots
            data = dct.get("data", "")
            return cls(
                vit_family=str(family),
                vit_ckpt=str(ckpt),
                layers=layers,
                n_blocks=0,
                n_patches_per_img=n_patches,
                cls_token=cls_token,
                d_vit=int(dct["d_vit"]),
                n_imgs=int(dct["n_imgs"]),
                n_imgs_per_shard=n_imgs_per_shard,
                dtype="float32",
                data=data if isinstance(data, dict) else {"kind": "saev-0.1", "repr": str(data)},
                seed=int(dct.get("seed", 0)),
                pretrained=True,
                protocol=LEGACY,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(
                f"{source}: not a saev metadata file (no 'protocol' key and not a reference "
                f"saev 0.1 layout: {err!r})."
            ) from err

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Metadata":
        """Read `path` (a metadata.json or the shard directory holding one)."""
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "metadata.json"
        if not path.is_file():
            raise UserError(f"{path}: no such file; is this a shard directory?")
        try:
            dct = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err}).") from err
        return cls.from_json(dct, source=str(path))

    def dump(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_json())
