"""Read a shard directory: memory-mapped shards, the image index, and an ordered loader.

`Shards(root)` checks everything it can up front (metadata, completion flags, file sizes),
so a truncated or half-written recording fails with one clear line instead of a numpy error
deep inside training. It also opens reference saev 0.1 directories (padded float32 shards,
no shards.json, no image index).
"""

import csv
import functools
import json
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
        with open(self.file, newline="", encoding="utf-8") as fd:
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
        # Sizes first: a shard file that exists always holds a whole shard (the writer renames
        # it into place only when complete), so a wrong size means the file and metadata.json
        # disagree, not that the recording is unfinished.
        present = []
        for i in range(md.n_shards):
            f = self.root / md.shard_file(i)
            present.append(f.is_file())
            if present[-1]:
                size = f.stat().st_size
                want = self._n_rows(i) * md.bytes_per_img
                if size != want and not (md.padded and size >= want):
                    raise UserError(self._size_message(f, self._n_rows(i), size))
        missing = [i for i, ok in enumerate(present) if not ok]
        if md.padded:
            if missing:
                raise UserError(
                    f"{self.root / md.shard_file(missing[0])}: shard file missing "
                    f"({len(missing)} of the {md.n_shards} shards metadata.json implies)."
                )
            return
        status = self.root / STATUS_FILE
        if not status.is_file():
            raise UserError(self._no_status_message(missing))
        self._check_status_layout(status)
        complete = read_status(self.root, md)
        missing = [i for i, done in enumerate(complete) if not done]
        if missing:
            raise UserError(
                f"{self.root}: recording incomplete, {len(missing)} of {md.n_shards} shards "
                f"missing or unfinished (first: {md.shard_file(missing[0])}); re-run the "
                "same `saev activations` command to finish it."
            )

    def _size_message(self, f: pathlib.Path, n: int, size: int) -> str:
        """Which numbers of metadata.json disagree with a shard file's size, and how."""
        md = self.md
        values = n * md.n_layers * md.n_tokens_per_img * md.d_vit
        want = values * md.np_dtype.itemsize
        # Name the single changes of metadata.json that would explain the size.
        fits = []
        other = {2: "float16", 4: "float32", 8: "float64"}
        if size % values == 0 and other.get(size // values, md.dtype) != md.dtype:
            fits.append(f"{other[size // values]} values")
        per_dim = values // md.d_vit * md.np_dtype.itemsize
        if size and size % per_dim == 0:
            fits.append(f"d_vit {size // per_dim}")
        hint = f"; that is the size of {', or of '.join(fits)}" if fits else ""
        return (
            f"{f}: {size:,} bytes, but {self.root / 'metadata.json'} says {n} images x "
            f"{md.n_layers} layers x {md.n_tokens_per_img} tokens x d_vit {md.d_vit} x "
            f"{md.dtype} = {want:,} bytes{hint}; the file is truncated, or metadata.json does "
            "not describe it."
        )

    def _no_status_message(self, missing: list[int]) -> str:
        md, status = self.md, self.root / STATUS_FILE
        if not missing:
            return (
                f"{status}: missing, but all {md.n_shards} shard files that metadata.json names "
                "are present with the right sizes (copied without it?); copy shards.json from "
                "the original recording."
            )
        if len(missing) == md.n_shards:
            return (
                f"{status}: missing, and so are all {md.n_shards} shard files that metadata.json "
                "names: the recording never started; run `saev activations`."
            )
        return (
            f"{status}: missing, and {len(missing)} of the {md.n_shards} shard files that "
            f"metadata.json names are missing too (first: {md.shard_file(missing[0])}); the "
            "recording is incomplete: re-run the same `saev activations` command."
        )

    def _check_status_layout(self, status: pathlib.Path) -> None:
        """shards.json must describe the shards metadata.json implies (same count and sizes)."""
        md = self.md
        try:
            entries = json.loads(status.read_text())["shards"]
            counts = [int(e["n_imgs"]) for e in entries]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise UserError(f"{status}: unreadable shard status ({err!r}).") from err
        want = [md.n_imgs_in(i) for i in range(md.n_shards)]
        if counts != want:
            i = next(
                (i for i, (a, b) in enumerate(zip(counts, want, strict=False)) if a != b),
                min(len(counts), len(want)),
            )
            msg = (
                f"{status}: lists {len(counts)} shards ({sum(counts)} images), but "
                f"{self.root / 'metadata.json'} says {md.n_shards} shards of "
                f"{md.n_imgs_per_shard} images ({md.n_imgs} in all)"
            )
            if i < min(len(counts), len(want)):
                msg += f"; {md.shard_file(i)}: {counts[i]} images there, {want[i]} in metadata.json"
            raise UserError(msg + "; the two files are from different recordings.")

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


def all_finite(x: np.ndarray) -> bool:
    """Whether every value of a float32 or float16 array is finite, in two cheap reductions.

    min and max propagate NaN and meet any infinity. float16 (slow arithmetic in numpy) is
    read as integers instead: a non-finite half has every exponent bit set, which makes it
    the largest of all values as uint16 when negative, and as int16 when positive."""
    if x.size == 0:
        return True
    if x.dtype == np.float16:
        return bool(x.view(np.uint16).max() < 0xFC00 and x.view(np.int16).max() < 0x7C00)
    return bool(np.isfinite(x.min()) and np.isfinite(x.max()))


def check_finite(
    shards: "Shards",
    shard_i: int,
    local: Int[np.ndarray, " n"],
    x: Float[np.ndarray, "n n_tok d_vit"],
    layer_pos: int,
    tok_start: int = 0,
) -> None:
    """UserError naming the shard file, image, layer and token of the first non-finite value
    of `x`: the activations of images `local` (indices within shard `shard_i`), tokens from
    `tok_start` on. Non-finite input is a data error: every SAE trained on it would fail."""
    if all_finite(x):
        return
    j, t, k = (int(v) for v in np.argwhere(~np.isfinite(x))[0])
    md = shards.md
    img = shard_i * md.n_imgs_per_shard + int(local[j])
    value = float(x[j, t, k])
    why = (
        "float16 overflowed while recording: re-record with --dtype float32"
        if md.dtype == "float16" and np.isinf(value)
        else "re-record it with `saev activations` (the ViT gave it, or the file is damaged)"
    )
    raise UserError(
        f"{shards.root / md.shard_file(shard_i)}: activation {value} at image {img}, layer "
        f"{md.layers[layer_pos]}, token {tok_start + t}, dim {k} is not finite; {why}."
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
        block = np.array(shards.acts(shard_i)[off : off + n, pos, sl], dtype=np.float32)
        check_finite(shards, shard_i, np.arange(off, off + n), block, pos, sl.start)
        yield torch.arange(i, i + n), torch.from_numpy(block)
        i += n
