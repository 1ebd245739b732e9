"""One streaming pass over every patch token: per-latent statistics and top-N images.

For each latent we keep its N best images, ranked by the image's strongest patch, plus
running counts, sums and maxima over all patch tokens. The state is a handful of
`[d_sae, top_n]` and `[d_sae]` tensors, so memory is O(d_sae * top_n) plus one batch,
whatever the number of images. Per-patch activations of the top images are *not* kept
(that dense `[d_sae, top_n, n_patches]` buffer is what ran out of memory in the reference
saev); the renderer re-encodes the few images it draws instead.

Ranking is deterministic: by value, descending, then by image index, ascending. An image
only enters a latent's list when its strongest patch is > 0, so a latent that never fires
has an empty list (image -1, value -inf).
"""

import collections.abc
import dataclasses
import math

import numpy as np
import torch
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped
from tqdm.auto import tqdm

Encode = collections.abc.Callable[[torch.Tensor], torch.Tensor]
"""Raw activations `[tokens, d_vit]` to codes `[tokens, d_sae]` (e.g. `sae.encode`)."""

Batches = collections.abc.Iterable[tuple[torch.Tensor, torch.Tensor]]
"""`(image indices [b], patch activations [b, n_patches, d_vit])`, e.g. from `iter_images`."""


@dataclasses.dataclass(frozen=True)
class TopKResult:
    """What the pass found, as CPU numpy arrays."""

    values: Float[np.ndarray, "d_sae top_n"]
    """Strongest-patch value of each top image; -inf in empty slots."""
    images: Int[np.ndarray, "d_sae top_n"]
    """Image index of each top image, best first; -1 in empty slots."""
    count: Int[np.ndarray, " d_sae"]
    """Patch tokens on which the latent is nonzero."""
    total: Float[np.ndarray, " d_sae"]
    """Sum of the latent's value over all patch tokens (float64)."""
    max: Float[np.ndarray, " d_sae"]
    """Largest value of the latent over all patch tokens."""
    n_tokens: int
    """Patch tokens seen."""
    n_imgs: int
    """Images seen."""

    @property
    def d_sae(self) -> int:
        return self.values.shape[0]

    @property
    def top_n(self) -> int:
        return self.values.shape[1]

    @property
    def freq(self) -> Float[np.ndarray, " d_sae"]:
        """Fraction of patch tokens on which the latent fires."""
        return self.count / max(self.n_tokens, 1)

    @property
    def mean(self) -> Float[np.ndarray, " d_sae"]:
        """Mean value over the tokens where the latent fires (0 for a latent that never fires)."""
        return np.where(self.count > 0, self.total / np.maximum(self.count, 1), 0.0)

    def truncate(self, top_n: int) -> "TopKResult":
        """The same result with only the first `top_n` images per latent."""
        return dataclasses.replace(
            self, values=self.values[:, :top_n].copy(), images=self.images[:, :top_n].copy()
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "values": torch.from_numpy(self.values),
            "images": torch.from_numpy(self.images),
            "count": torch.from_numpy(self.count),
            "total": torch.from_numpy(self.total),
            "max": torch.from_numpy(self.max),
            "sizes": torch.tensor([self.n_tokens, self.n_imgs], dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "TopKResult":
        n_tokens, n_imgs = (int(x) for x in tensors["sizes"])
        return cls(
            values=tensors["values"].numpy(),
            images=tensors["images"].numpy(),
            count=tensors["count"].numpy(),
            total=tensors["total"].numpy(),
            max=tensors["max"].numpy(),
            n_tokens=n_tokens,
            n_imgs=n_imgs,
        )


class TopKAccumulator:
    """Streaming per-latent statistics and top-N images; feed it batches of codes."""

    def __init__(self, d_sae: int, top_n: int, device: str | torch.device = "cpu"):
        if top_n < 1:
            raise ValueError(f"top_n={top_n} must be >= 1.")
        self.d_sae, self.top_n, self.device = d_sae, top_n, torch.device(device)
        kw = {"device": self.device}
        self.values = torch.full((d_sae, top_n), -math.inf, dtype=torch.float32, **kw)
        self.images = torch.full((d_sae, top_n), -1, dtype=torch.int64, **kw)
        self.count = torch.zeros(d_sae, dtype=torch.int64, **kw)
        self.total = torch.zeros(d_sae, dtype=torch.float64, **kw)
        self.max = torch.full((d_sae,), -math.inf, dtype=torch.float32, **kw)
        self.n_tokens = 0
        self.n_imgs = 0

    def state_nbytes(self) -> int:
        """Bytes held between batches; depends on d_sae and top_n only."""
        bufs = (self.values, self.images, self.count, self.total, self.max)
        return sum(t.numel() * t.element_size() for t in bufs)

    @torch.inference_mode()
    def update(self, img_i: torch.Tensor, f: torch.Tensor) -> None:
        """Add codes `f[b, n_patches, d_sae]` of the images `img_i[b]`."""
        b, n_patches, d_sae = f.shape
        if d_sae != self.d_sae:
            raise ValueError(f"codes have d_sae={d_sae}, expected {self.d_sae}.")
        f = f.to(self.device, torch.float32)
        img_i = img_i.to(self.device, torch.int64)

        flat = f.reshape(b * n_patches, d_sae)
        self.count += (flat != 0).sum(dim=0, dtype=torch.int32)  # int32 reduces fastest
        # Sum one batch in float32 (cheap, exact enough), accumulate batches in float64.
        self.total += flat.sum(dim=0).double()
        best = f.amax(dim=1)  # [b, d_sae]: each image's strongest patch
        torch.maximum(self.max, best.amax(dim=0), out=self.max)
        self.n_tokens += b * n_patches
        self.n_imgs += b

        scores = best.T  # [d_sae, b]
        # Images whose strongest patch is not positive never enter a list.
        scores = torch.where(scores > 0, scores, torch.full_like(scores, -math.inf))
        cand_v = torch.cat([self.values, scores], dim=1)
        cand_i = torch.cat([self.images, img_i.expand(d_sae, b)], dim=1)
        # Order by (value desc, image asc) with two stable sorts: the second sort keeps the
        # image order of the first among equal values, so ties resolve the same way whatever
        # the batch size or image order. Empty slots carry image -1 but value -inf, so they
        # sort last.
        by_img = torch.sort(cand_i, dim=1, stable=True).indices
        cand_v, cand_i = cand_v.gather(1, by_img), cand_i.gather(1, by_img)
        by_val = torch.sort(cand_v, dim=1, descending=True, stable=True).indices[:, : self.top_n]
        self.values = cand_v.gather(1, by_val)
        self.images = torch.where(
            torch.isfinite(self.values), cand_i.gather(1, by_val), torch.full_like(by_val, -1)
        )

    def result(self) -> TopKResult:
        return TopKResult(
            values=self.values.cpu().numpy(),
            images=self.images.cpu().numpy(),
            count=self.count.cpu().numpy(),
            total=self.total.cpu().numpy(),
            max=torch.nan_to_num(self.max, neginf=0.0).cpu().numpy(),
            n_tokens=self.n_tokens,
            n_imgs=self.n_imgs,
        )


@jaxtyped(typechecker=beartype)
def encode_patches(
    encode: Encode, acts: Float[torch.Tensor, "b n_patches d_vit"]
) -> Float[torch.Tensor, "b n_patches d_sae"]:
    """Encode every patch of a batch of images, keeping the image axis."""
    b, n_patches, d_vit = acts.shape
    return encode(acts.reshape(b * n_patches, d_vit)).reshape(b, n_patches, -1)


def run_pass(
    batches: Batches,
    encode: Encode,
    *,
    d_sae: int,
    top_n: int,
    device: str | torch.device = "cpu",
    n_imgs: int | None = None,
) -> TopKResult:
    """Encode every batch on `device` and accumulate per-latent statistics and top images.

    `n_imgs` only sizes the progress bar.
    """
    acc = TopKAccumulator(d_sae, top_n, device)
    bar = tqdm(total=n_imgs, unit="img", desc="top-k pass", dynamic_ncols=True)
    with torch.inference_mode(), bar:
        for img_i, acts in batches:
            acts = acts.to(device, non_blocking=True).float()
            f = encode_patches(encode, acts)
            acc.update(img_i, f)
            bar.update(len(img_i))
    return acc.result()
