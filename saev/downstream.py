"""`saev evaluate --downstream`: what the ViT loses when an SAE replaces its layer.

Reconstruction error (FVU) says how well an SAE copies its input, not whether the model still
works on the copy. Here the recording's ViT is rebuilt from the shard metadata (same family,
checkpoint, random-weight seed, transform) and run on held-out images three ways:

- clean: the model as it is;
- spliced: the SAE's reconstruction x̂ in place of the trained layer's residual stream at the
  tokens the SAE was trained on (patches, cls or all; register tokens untouched);
- floor: those tokens mean-ablated, i.e. replaced by their mean over the shards (per token
  class: the CLS token's mean for CLS, the mean over all patch tokens for every patch).

Per SAE it reports how far the spliced (and the floor) output is from the clean one: cosine of
the final image embeddings, and for models with a classifier the KL(clean || spliced) of the
class distributions and top-1 agreement; then the fraction recovered,
(floor − spliced) / (floor − clean), of the KL and of 1 − cosine, as in SAELens/SAEBench's
"loss recovered". The same numbers with the SAE's error term added back (x̂ + (x − x̂), in
float64 so that it equals x exactly) must be the clean ones: that checks the splicing itself.

The clean and floor passes are shared by every SAE of a group; only the spliced passes are
per SAE. Every batch's clean activations are also compared with the stored ones, so a wrong
image folder or different weights stop the run instead of giving meaningless numbers.
"""

import dataclasses
import logging
import pathlib
import typing
from collections.abc import Callable

import numpy as np
import PIL.Image
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from saev.errors import UserError
from saev.images import ImageDataset, ImageList
from saev.images.common import Reader
from saev.recorded import recorded
from saev.shards import Shards, Tokens
from saev.vits import Vit, make_recorded_vit, splice

logger = logging.getLogger("saev.downstream")

ACTS_WARN = 0.01
"""Relative error between recomputed and stored activations above which we warn (float16
storage and TF32 GPU kernels give ~1e-3)."""
ACTS_FAIL = 0.1
"""... and above which the images or the weights are not the recorded ones: stop."""


@dataclasses.dataclass(frozen=True)
class DownstreamConfig:
    """How many images the spliced ViT runs on, and how they are read (with --downstream)."""

    n_imgs: int = 2000
    """Held-out images to run the ViT on, evenly spaced over the eval split (0 = all of them)."""
    batch_size: int = 32
    """Images per ViT forward pass."""
    n_mean_imgs: int = 1000
    """Training-split images whose stored activations give the mean for the floor (evenly spaced; 0 = all)."""
    n_workers: int = 2
    """DataLoader worker processes that decode images (0: decode in the main process)."""


@dataclasses.dataclass(frozen=True)
class ImagesConfig:
    """Where the recorded images are now (only --downstream reads images)."""

    root: pathlib.Path | None = None
    """Folder the paths in the shards' images.csv are relative to; default: the recording's data.root."""


class Output(typing.NamedTuple):
    """One way of running the model on a batch: image embeddings and (with a head) logits."""

    emb: Float[Tensor, "b e"]
    logp: Float[Tensor, "b c"] | None
    """float64 log-probabilities of the classifier, None without one."""


class Agreement:
    """Running per-image sums comparing one way of running the model with the clean run."""

    def __init__(self):
        self.n = 0
        self.sum_cos = 0.0
        self.sum_kl = 0.0
        self.n_top1 = 0

    @torch.no_grad()
    def update(self, clean: Output, other: Output) -> None:
        cos = torch.nn.functional.cosine_similarity(
            clean.emb.double(), other.emb.double(), dim=-1, eps=1e-12
        )
        self.sum_cos += float(cos.sum())
        self.n += cos.shape[0]
        if clean.logp is not None and other.logp is not None:
            kl = (clean.logp.exp() * (clean.logp - other.logp)).sum(dim=-1)
            self.sum_kl += float(kl.sum())
            self.n_top1 += int((clean.logp.argmax(-1) == other.logp.argmax(-1)).sum())

    def result(self, has_head: bool) -> dict[str, float | None]:
        n = max(self.n, 1)
        return {
            "cosine": self.sum_cos / n,
            "kl": self.sum_kl / n if has_head else None,
            "top1_agreement": self.n_top1 / n if has_head else None,
        }


def recovered(floor: float | None, spliced: float | None, clean: float | None) -> float | None:
    """(floor − spliced) / (floor − clean) of a loss: 1 when splicing costs nothing, 0 when it
    costs as much as mean-ablation; None when undefined (no head, or a floor that costs
    nothing either)."""
    if floor is None or spliced is None or clean is None or floor == clean:
        return None
    return (floor - spliced) / (floor - clean)


def recovered_fracs(clean: dict, floor: dict, spliced: dict) -> dict[str, float | None]:
    """Fraction recovered of the KL and of 1 − cosine, from three `Agreement.result`s."""
    return {
        "recovered_kl": recovered(floor["kl"], spliced["kl"], clean["kl"]),
        "recovered_cosine": recovered(
            1.0 - floor["cosine"], 1.0 - spliced["cosine"], 1.0 - clean["cosine"]
        ),
    }


# The model, the images and the mean.


def rebuild_vit(shards: Shards) -> Vit:
    """The ViT that recorded `shards`, with its classifier when it has one (timm ImageNet)."""
    md = shards.md
    vit = make_recorded_vit(
        md.vit_family, md.vit_ckpt, pretrained=md.pretrained, seed=md.seed, head=True
    )
    facts = [
        ("d_vit", md.d_vit, vit.d_vit),
        ("n_patches_per_img", md.n_patches_per_img, vit.n_patches),
        ("cls_token", md.cls_token, vit.cls_token),
    ]
    if md.n_blocks:  # 0 in reference saev 0.1 metadata (unknown)
        facts.append(("n_blocks", md.n_blocks, vit.n_blocks))
    for key, want, got in facts:
        if want != got:
            raise UserError(
                f"{shards.root / 'metadata.json'}: {key}={want}, but {md.vit_family} "
                f"{md.vit_ckpt!r} rebuilt here has {key}={got}; cannot splice into another model."
            )
    return vit


def spread(idx: Int[np.ndarray, " n"], n: int) -> Int[np.ndarray, " m"]:
    """`n` entries of `idx` evenly spaced over it (all of it when n is 0 or >= len(idx))."""
    if n <= 0 or n >= idx.size:
        return idx
    return idx[(np.arange(n) * idx.size) // n]


def layer_mean(
    shards: Shards, layer: int, imgs: Int[np.ndarray, " n"]
) -> Float[Tensor, "n_tokens d_vit"]:
    """Mean stored activation of block `layer` over images `imgs`, per token class, in the
    stored layout: row 0 (CLS, when stored) is the CLS token's mean, every patch row the mean
    over all patch tokens. Accumulated in float64."""
    md = shards.md
    if imgs.size == 0:
        raise UserError(f"{shards.root}: no images to take the mean activation over.")
    pos = shards.layer_pos(layer)
    cls = int(md.cls_token)
    sum_cls = np.zeros(md.d_vit, dtype=np.float64)
    sum_patch = np.zeros(md.d_vit, dtype=np.float64)
    for i in imgs.tolist():
        acts = np.asarray(shards.img_acts(i)[pos], dtype=np.float64)  # [n_tokens, d]
        if cls:
            sum_cls += acts[0]
        sum_patch += acts[cls:].sum(axis=0)
    mean = np.empty((md.n_tokens_per_img, md.d_vit), dtype=np.float64)
    if cls:
        mean[0] = sum_cls / imgs.size
    mean[cls:] = sum_patch / (imgs.size * md.n_patches_per_img)
    return torch.from_numpy(mean).float()


@dataclasses.dataclass
class _Rows:
    """Image j of a subset of a recording's images: `reader(rows[j])`. Picklable (loader
    workers) when the reader is, as `saev.images.hf.Reader` is."""

    reader: Reader
    rows: list[int]

    def __call__(self, j: int) -> PIL.Image.Image:
        return self.reader(self.rows[j])

    def sizes(self) -> list[int]:
        every = self.reader.sizes()
        return [every[i] for i in self.rows]


def image_files(
    shards: Shards, imgs: Int[np.ndarray, " n"], root: pathlib.Path | None
) -> ImageList:
    """The images `imgs` of the recording, in that order: files through the shards'
    images.csv, or rows of the Hugging Face dataset an `images:hf` recording read (reopened as
    `saev visuals` does); UserError when they are not where the recording (or `--images.root`)
    says."""
    index = shards.images
    data = shards.md.data if isinstance(shards.md.data, dict) else {}
    if data.get("kind") == "hf":
        rec = recorded(shards, root)
        rows = imgs.tolist()
        return ImageList(
            root=pathlib.Path(root or data.get("root") or data.get("name")),
            paths=[index.path(i) for i in rows],
            labels={},
            data=data,
            reader=_Rows(rec.opener, rows),
        )
    if root is None:
        if not data.get("root"):
            raise UserError(
                f"{shards.root / 'metadata.json'}: records no image folder (data.root); pass "
                f"--images.root DIR, the folder the paths in {index.file} are relative to."
            )
        root = pathlib.Path(data["root"])
    root = pathlib.Path(root).expanduser()
    paths = [index.path(i) for i in imgs.tolist()]
    missing = [p for p in paths if not (root / p).is_file()]
    if missing:
        raise UserError(
            f"{root / missing[0]}: image not found ({len(missing)} of {len(paths)} held-out "
            f"images missing); pass --images.root DIR, the folder the paths in {index.file} "
            "are relative to."
        )
    return ImageList(root=root, paths=paths, labels={}, data=data)


# Splicing.

TokenFn = Callable[[Float[Tensor, "b t d"]], Float[Tensor, "b t d"]]


def replace_tokens(sl: slice, fn: TokenFn) -> TokenFn:
    """A `splice` function that replaces the stored tokens `sl` by `fn` of them."""

    def apply(x: Tensor) -> Tensor:
        out = x.clone()
        out[:, sl] = fn(x[:, sl])
        return out

    return apply


def sae_fn(sae, *, add_error: bool = False) -> TokenFn:
    """x -> x̂ (the SAE's reconstruction); with `add_error`, x̂ + (x − x̂) in float64, which
    is x exactly (the difference of two float32 numbers is exact in float64)."""

    def fn(x: Tensor) -> Tensor:
        # The stack's own forward (inference rule, as `sae.eval()` keeps it) decodes top-k
        # codes sparsely; `sae(x)` goes through dense codes, ~1.5x the time on a CPU.
        x_hat = sae.stack(x.reshape(-1, x.shape[-1])).x_hat[0].reshape(x.shape)
        if not add_error:
            return x_hat
        x64, x_hat64 = x.double(), x_hat.double()
        return (x_hat64 + (x64 - x_hat64)).to(x.dtype)

    return fn


def mean_fn(mean: Float[Tensor, "t d"]) -> TokenFn:
    """x -> the mean of each token (mean-ablation)."""
    return lambda x: mean.expand_as(x)


def keep_in(captured: list[Tensor]) -> TokenFn:
    """x -> x, keeping x (the clean pass's activations, to check against the stored ones)."""

    def fn(x: Tensor) -> Tensor:
        captured.append(x)
        return x

    return fn


def run_model(vit: Vit, imgs: Tensor, layer: int, fn: TokenFn | None = None) -> Output:
    """The model's output on `imgs`, with block `layer`'s stored tokens replaced by `fn` of them."""
    if fn is None:
        emb = vit(imgs)
    else:
        with splice(vit, layer, fn):
            emb = vit(imgs)
    logp = None
    if vit.head is not None:
        logp = torch.log_softmax(vit.head(emb).double(), dim=-1)
    return Output(emb, logp)


# The evaluation.


@dataclasses.dataclass
class Tally:
    """Agreement of each way of running the model with the clean run, over the images so far."""

    clean: Agreement  # the clean run with itself: the "clean" term of the fraction recovered
    floor: Agreement
    spliced: list[Agreement]
    error_term: list[Agreement]
    n_skipped: int = 0
    acts_rel_err: float = 0.0


@torch.inference_mode()
def evaluate(
    saes: list,
    shards: Shards,
    layer: int,
    tokens: Tokens,
    *,
    eval_imgs: Int[np.ndarray, " n_eval"],
    mean_imgs: Int[np.ndarray, " n_mean"],
    cfg: DownstreamConfig = DownstreamConfig(),
    images_root: pathlib.Path | None = None,
    device: str | torch.device = "cpu",
) -> list[dict]:
    """The `downstream` object of each SAE in `saes` (all trained on `layer`/`tokens` of
    `shards`), on `cfg.n_imgs` of `eval_imgs`, with the floor's mean over `cfg.n_mean_imgs`
    of `mean_imgs`."""
    check_config(cfg)
    device = torch.device(device)
    imgs = spread(np.asarray(eval_imgs), cfg.n_imgs)
    files = image_files(shards, imgs, images_root)  # fail on missing images before any work
    vit = rebuild_vit(shards).to(device)
    mean_from = spread(np.asarray(mean_imgs), cfg.n_mean_imgs)
    mean = layer_mean(shards, layer, mean_from).to(device)
    loader = torch.utils.data.DataLoader(
        ImageDataset(files, vit.transform, vit.image_size),
        batch_size=cfg.batch_size,
        num_workers=cfg.n_workers,
        pin_memory=device.type == "cuda",
    )
    tally = run_batches(vit, saes, shards, layer, tokens, mean, imgs, loader, device)
    if tally.clean.n == 0:
        raise UserError(f"{files.root}: none of the {len(imgs)} held-out images could be decoded.")
    if tally.n_skipped:
        logger.warning("%d held-out images could not be decoded; left out.", tally.n_skipped)
    if tally.acts_rel_err > ACTS_WARN:
        logger.warning(
            "%s: recomputed activations differ from the stored ones by up to %.3g (relative).",
            shards.root,
            tally.acts_rel_err,
        )
    has_head = vit.head is not None
    clean, floor = tally.clean.result(has_head), tally.floor.result(has_head)
    common = {
        "n_imgs": tally.clean.n,
        "n_skipped": tally.n_skipped,
        "layer": vit.resolve_layers([layer])[0],
        "tokens": tokens,
        "has_head": has_head,
        "n_mean_imgs": int(mean_from.size),
        "acts_rel_err": tally.acts_rel_err,
    }
    out = []
    for sp, et in zip(tally.spliced, tally.error_term, strict=True):
        spliced, error_term = sp.result(has_head), et.result(has_head)
        out.append(
            {
                **common,
                **spliced,
                **recovered_fracs(clean, floor, spliced),
                "floor": floor,
                "error_term": {**error_term, **recovered_fracs(clean, floor, error_term)},
            }
        )
    return out


def check_config(cfg: DownstreamConfig) -> None:
    for key in ("n_imgs", "n_mean_imgs", "n_workers"):
        if getattr(cfg, key) < 0:
            flag = "--downstream." + key.replace("_", "-")
            raise UserError(f"{flag} {getattr(cfg, key)}: expected >= 0.")
    if cfg.batch_size < 1:
        raise UserError(f"--downstream.batch-size {cfg.batch_size}: expected >= 1.")


def run_batches(
    vit: Vit,
    saes: list,
    shards: Shards,
    layer: int,
    tokens: Tokens,
    mean: Float[Tensor, "n_tokens d_vit"],
    imgs: Int[np.ndarray, " n"],
    loader: torch.utils.data.DataLoader,
    device: torch.device,
) -> Tally:
    """Per batch: the clean pass (its activations checked against the stored ones), the floor,
    then each SAE spliced in, and with its error term added back."""
    block, pos, sl = (
        vit.resolve_layers([layer])[0],
        shards.layer_pos(layer),
        shards.token_slice(tokens),
    )
    floor_fn = replace_tokens(sl, mean_fn(mean[sl]))
    recon_fns = [replace_tokens(sl, sae_fn(sae)) for sae in saes]
    error_fns = [replace_tokens(sl, sae_fn(sae, add_error=True)) for sae in saes]
    tally = Tally(
        Agreement(), Agreement(), [Agreement() for _ in saes], [Agreement() for _ in saes]
    )
    bar = tqdm(total=len(imgs), unit="img", desc="downstream")
    for x, local, ok in loader:
        bar.update(len(ok))
        if not bool(ok.all()):  # undecodable files come back as black images: leave them out
            tally.n_skipped += int((~ok).sum())
            x, local = x[ok], local[ok]
            if x.shape[0] == 0:
                continue
        x = x.to(device, non_blocking=True)
        captured: list[Tensor] = []
        clean = run_model(vit, x, block, keep_in(captured))
        err = stored_rel_err(shards, pos, imgs[local.numpy()], captured[0])
        check_stored(err, shards, loader.dataset.images.root)  # stop before spending time on it
        tally.acts_rel_err = max(tally.acts_rel_err, err)
        tally.clean.update(clean, clean)
        tally.floor.update(clean, run_model(vit, x, block, floor_fn))
        for i in range(len(saes)):
            tally.spliced[i].update(clean, run_model(vit, x, block, recon_fns[i]))
            tally.error_term[i].update(clean, run_model(vit, x, block, error_fns[i]))
    bar.close()
    return tally


def stored_rel_err(
    shards: Shards, pos: int, imgs: Int[np.ndarray, " b"], acts: Float[Tensor, "b t d"]
) -> float:
    """‖recomputed − stored‖ / ‖stored‖ over a batch of images' activations at layer `pos`."""
    stored = torch.from_numpy(np.stack([shards.img_acts(i)[pos] for i in imgs.tolist()]))
    stored = stored.double()
    diff = acts.detach().to("cpu", torch.float64) - stored
    return float(diff.norm() / stored.norm().clamp_min(1e-12))


def check_stored(err: float, shards: Shards, root: pathlib.Path) -> None:
    """UserError when the recomputed activations are not the stored ones (beyond rounding)."""
    if err > ACTS_FAIL:
        raise UserError(
            f"{shards.root}: the ViT rebuilt from metadata.json, run on the images under {root}, "
            f"does not reproduce the stored activations (relative error {err:.3g}); the images "
            "or the weights are not the recorded ones (pass --images.root DIR for the right images)."
        )
