"""Read a shard directory: memory-mapped shards, the image index, and an ordered loader.

`Shards(root)` checks everything it can up front (metadata, completion flags, file sizes),
so a truncated or half-written recording fails with one clear line instead of a numpy error
deep inside training. It also opens reference saev 0.1 directories (padded float32 shards,
no shards.json, no image index).
"""

import csv
import functools
import os
import pathlib
import typing
from collections.abc import Iterator

import numpy as np
import torch
from jaxtyping import Float, Int

from saev.errors import UserError
from saev.shards.metadata import Metadata
from saev.shards.writer import INDEX_FILE, STATUS_FILE, read_status

Tokens = typing.Literal["patches", "cls", "all"]


class ImageIndex:
    """images.csv: one row per image index, `index,path,<labels...>`."""

    def __init__(self, path: str | os.PathLike):
        self.file = pathlib.Path(path)
        if not self.file.is_file():
            raise UserError(f"{self.file}: no image index; re-record with `saev activations`.")
        with open(self.file, newline="") as fd:
            reader = csv.reader(fd)
            header = next(reader, None)
            if header is None or header[:2] != ["index", "path"]:
                raise UserError(f"{self.file}: expected a header starting 'index,path'.")
            self.columns: list[str] = header
            rows = list(reader)
        self._cols = {
            name: [r[j] if j < len(r) else "" for r in rows] for j, name in enumerate(header)
        }
        for i, idx in enumerate(self._cols["index"]):
            if idx != str(i):
                raise UserError(f"{self.file}: row {i + 1} has index {idx!r}; expected {i}.")

    @property
    def label_names(self) -> list[str]:
        return self.columns[2:]

    def path(self, i: int) -> str:
        """Path of image `i`, relative to the dataset root (metadata `data.root`)."""
        return self._cols["path"][i]

    def paths(self) -> list[str]:
        return list(self._cols["path"])

    def labels(self, name: str) -> list[str]:
        """Label `name` of every image, as strings ("" = missing)."""
        if name not in self.label_names:
            raise UserError(
                f"{self.file}: no label column {name!r}; columns are {self.label_names}."
            )
        return list(self._cols[name])

    def __len__(self) -> int:
        return len(self._cols["index"])


class Shards:
    """A validated shard directory (see docs/formats.md)."""

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise UserError(f"{self.root}: shard directory does not exist.")
        self.md = Metadata.load(self.root)
        md = self.md
        if not md.padded:
            if not (self.root / STATUS_FILE).is_file():
                raise UserError(f"{self.root / STATUS_FILE}: missing; the recording never started.")
            complete = read_status(self.root, md)
            missing = [i for i, done in enumerate(complete) if not done]
            if missing:
                raise UserError(
                    f"{self.root}: recording incomplete, {len(missing)} of {md.n_shards} shards "
                    f"missing or unfinished (first: {md.shard_file(missing[0])}); re-run the "
                    "same `saev activations` command to finish it."
                )
        for i in range(md.n_shards):
            f = self.root / md.shard_file(i)
            want = self._n_rows(i) * md.bytes_per_img
            if not f.is_file():
                raise UserError(f"{f}: shard file missing ({md.n_shards} shards expected).")
            size = f.stat().st_size
            if size != want and not (md.padded and size >= want):
                raise UserError(
                    f"{f}: {size} bytes; expected {want} ({self._n_rows(i)} images x "
                    f"{md.bytes_per_img} bytes). The file is truncated or from another recording."
                )

    @property
    def n_imgs(self) -> int:
        return self.md.n_imgs

    def n_imgs_in(self, shard_i: int) -> int:
        return self.md.n_imgs_in(shard_i)

    def _n_rows(self, shard_i: int) -> int:
        # Rows physically in the file: reference saev 0.1 padded every shard to full size.
        if self.md.padded:
            return min(
                self.md.n_imgs_per_shard, self.md.n_imgs - shard_i * self.md.n_imgs_per_shard
            )
        return self.md.n_imgs_in(shard_i)

    @functools.cache  # noqa: B019 (one memmap per shard for the object's life)
    def acts(self, shard_i: int) -> np.memmap:
        """Read-only memmap `[imgs_in_shard, n_layers, n_tokens, d_vit]` of `md.dtype`."""
        n = self.n_imgs_in(shard_i)
        return np.memmap(
            self.root / self.md.shard_file(shard_i),
            mode="r",
            dtype=self.md.np_dtype,
            shape=(n, *self.md.img_shape),
        )

    def img_acts(self, img_i: int) -> np.ndarray:
        """`[n_layers, n_tokens, d_vit]` of image `img_i`."""
        if not 0 <= img_i < self.n_imgs:
            raise IndexError(f"image {img_i} out of range [0, {self.n_imgs})")
        shard_i, pos = divmod(img_i, self.md.n_imgs_per_shard)
        return self.acts(shard_i)[pos]

    def layer_pos(self, layer: int) -> int:
        """Position in `md.layers` of block `layer` (negative counts from the ViT's depth)."""
        if layer in self.md.layers:
            return self.md.layers.index(layer)
        resolved = self.md.resolve_layer(layer)
        if resolved in self.md.layers:
            return self.md.layers.index(resolved)
        raise UserError(
            f"layer {layer} was not recorded in {self.root}; recorded layers: {self.md.layers}"
            + (f" (of {self.md.n_blocks} blocks)." if self.md.n_blocks else ".")
        )

    def token_slice(self, tokens: Tokens) -> slice:
        """Token-axis selection: CLS only, patches only, or everything stored."""
        has_cls = int(self.md.cls_token)
        if tokens == "all":
            return slice(0, self.md.n_tokens_per_img)
        if tokens == "patches":
            return slice(has_cls, self.md.n_tokens_per_img)
        if tokens == "cls":
            if not self.md.cls_token:
                raise UserError(f"{self.root}: tokens='cls' asked, but this ViT has no CLS token.")
            return slice(0, 1)
        raise UserError(f"tokens={tokens!r}; expected one of patches, cls, all.")

    @functools.cached_property
    def images(self) -> ImageIndex:
        return ImageIndex(self.root / INDEX_FILE)

    def __repr__(self) -> str:
        md = self.md
        return (
            f"Shards({str(self.root)!r}: {md.n_imgs} images x {md.n_layers} layers x "
            f"{md.n_tokens_per_img} tokens x {md.d_vit}, {md.dtype}, {md.n_shards} shards)"
        )


def iter_images(
    shards: Shards,
    layer: int,
    *,
    batch_size: int,
    tokens: Tokens = "all",
    start: int = 0,
    stop: int | None = None,
) -> Iterator[tuple[Int[torch.Tensor, " b"], Float[torch.Tensor, "b n_tok d_vit"]]]:
    """Ordered loader: images `[start, stop)` of one layer, in batches, as float32 tensors.

    Batches never straddle shards, so the last batch of each shard may be smaller.
    """
    stop = shards.n_imgs if stop is None else min(stop, shards.n_imgs)
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}; expected >= 1.")
    pos = shards.layer_pos(layer)
    sl = shards.token_slice(tokens)
    per = shards.md.n_imgs_per_shard
    i = max(start, 0)
    while i < stop:
        shard_i, off = divmod(i, per)
        n = min(batch_size, stop - i, shards.n_imgs_in(shard_i) - off)
        block = shards.acts(shard_i)[off : off + n, pos, sl]
        x = torch.from_numpy(np.array(block, dtype=np.float32))
        yield torch.arange(i, i + n), x
        i += n
