"""`python -m saev visuals`: what each latent fires on, as a static web page.

1. One streaming pass over every patch token of the SAE's layer (`saev.visuals.topk`),
   cached in `OUT/cache/` and reused when only display options change.
2. Pick latents by log-frequency and log-value bands, an explicit list, or the n most
   frequent/strongest.
3. Re-encode just the top images of those latents, draw their heatmaps
   (`saev.visuals.render`) and write the explorer (`saev.visuals.site`).
"""

import collections
import dataclasses
import hashlib
import logging
import pathlib
import time
import typing

import matplotlib
import numpy as np
import safetensors.torch
import torch
from tqdm.auto import tqdm

import saev.nn
from saev.calibration import calibrate_for_shards
from saev.errors import UserError
from saev.helpers import resolve_device
from saev.recorded import Recorded, recorded
from saev.shards import Shards, iter_images
from saev.visuals import render, site, topk

logger = logging.getLogger("saev.visuals")

CACHE_VERSION = 1
"""Bumped whenever the cached pass results change meaning."""
CACHE_FILE = "cache/topk.safetensors"
MAX_LABEL_VALUES = 50
"""Label columns with more distinct values than this (ids, free text) get no distribution."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    shard_root: pathlib.Path | None = None
    """Shard directory written by `saev activations`; default: the one the checkpoint was trained on."""


@dataclasses.dataclass(frozen=True)
class ImagesConfig:
    root: pathlib.Path | None = None
    """Where the images are: the directory the image index paths are relative to (images:hf: the save_to_disk directory); default: where the shards' metadata says they were recorded from. Required for saev 0.1 shards of an image folder (their image order is rebuilt from it)."""


@dataclasses.dataclass(frozen=True)
class Config:
    ckpt: pathlib.Path
    """SAE checkpoint directory (config.json + sae.safetensors), a saev 0.1 sae.pt or its run directory."""
    out: pathlib.Path
    """Output directory: index.html, latents/<id>.html, images, heatmaps and the pass cache."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    images: ImagesConfig = dataclasses.field(default_factory=ImagesConfig)
    top_n: int = 16
    """Top images kept per latent (ranked by the image's strongest patch)."""
    n_latents: int = 512
    """Latents to render, picked among those inside both ranges (see --pick)."""
    log_freq_range: tuple[float, float] = (-6.0, -2.0)
    """Render only latents whose log10 firing frequency (over patch tokens) lies in [lo, hi]."""
    log_value_range: tuple[float, float] = (-1.0, 1.0)
    """Render only latents whose log10 mean value when firing lies in [lo, hi]."""
    include_latents: tuple[int, ...] = ()
    """Latents always rendered, whatever the ranges."""
    pick: typing.Literal["random", "freq", "mean", "max"] = "random"
    """How to choose --n-latents among the latents in range: a seeded random sample, or the most frequent / highest mean / highest max."""
    seed: int = 0
    """Seed of the random pick."""
    layer: int | None = None
    """Block index to read; default: the layer the SAE was trained on (from its config)."""
    batch_size: int = 32
    """Images per batch in the pass (each batch encodes batch_size x n_patches tokens)."""
    device: str = "auto"
    """Torch device for encoding: auto (cuda if available), cpu, cuda, cuda:1, ..."""
    colormap: str = "plasma"
    """Matplotlib colormap of the heatmaps."""
    recompute: bool = False
    """Ignore the cached pass results in OUT/cache and run the pass again."""


def main(cfg: Config) -> None:
    t0 = time.perf_counter()
    if cfg.top_n < 1:
        raise UserError(f"--top-n {cfg.top_n}; expected >= 1.")
    if cfg.n_latents < 0:
        raise UserError(f"--n-latents {cfg.n_latents}; expected >= 0.")
    if cfg.colormap not in _colormaps():
        raise UserError(f"--colormap {cfg.colormap!r} is not a matplotlib colormap (try plasma).")
    sae = _load_sae(cfg.ckpt)
    shard_root = cfg.data.shard_root or sae.cfg.get("shard_root")
    if shard_root is None:
        raise UserError(f"--ckpt {cfg.ckpt} records no shard directory; pass --data.shard-root.")
    if not pathlib.Path(shard_root).is_dir():
        raise UserError(f"--data.shard-root {shard_root}: no such shard directory.")
    shards = Shards(shard_root)
    layer = check_compatible(sae, shards, cfg.layer, cfg.ckpt)
    calibrate_for_shards(sae, shards, layer, "patches")
    device = resolve_device(cfg.device)
    sae = sae.to(device).eval()
    images = recorded(shards, cfg.images.root, placeholders_ok=True)

    key = cache_key(cfg.ckpt, shards, layer)
    result = load_cache(cfg.out, key, cfg.top_n) if not cfg.recompute else None
    cached = result is not None
    if result is None:
        t_pass = time.perf_counter()
        result = topk_pass(
            sae.encode, shards, layer, top_n=cfg.top_n, batch_size=cfg.batch_size, device=device
        )
        pass_s = time.perf_counter() - t_pass
        save_cache(cfg.out, key, result)
    result = result.truncate(cfg.top_n)

    latents = select_latents(
        result,
        log_freq_range=cfg.log_freq_range,
        log_value_range=cfg.log_value_range,
        n_latents=cfg.n_latents,
        include=cfg.include_latents,
        pick=cfg.pick,
        seed=cfg.seed,
    )
    views, n_missing, n_imgs = render_latents(
        sae.encode,
        shards,
        layer,
        result,
        latents,
        out=cfg.out,
        images=images,
        batch_size=cfg.batch_size,
        device=device,
        colormap=cfg.colormap,
    )
    info = {
        "checkpoint": str(cfg.ckpt),
        "shards": str(shards.root),
        "layer": layer,
        "d_sae": result.d_sae,
        "images": result.n_imgs,
        "patches": result.n_tokens,
    }
    site.write_site(cfg.out, views, result, info, base_rates(images.index))

    n_dead = int((result.count == 0).sum())
    how = (
        "reused cached pass"
        if cached
        else f"pass {result.n_tokens / max(pass_s, 1e-9):,.0f} patches/s"
    )
    print(
        f"visuals: {result.n_imgs} images, {result.n_tokens:,} patch tokens of layer {layer} "
        f"({how}); {n_dead} of {result.d_sae} latents never fired."
    )
    print(
        f"rendered {len(views)} latents over {n_imgs} images"
        + (
            f" ({n_missing} missing or unreadable in {images.where}, drawn as placeholders)"
            if n_missing
            else ""
        )
        + f" in {time.perf_counter() - t0:.1f}s; open {cfg.out / 'index.html'}"
    )
    if n_imgs and n_missing == n_imgs and images.index is not None:
        print(
            f"warning: none of the {n_imgs} images were found in {images.where}; check --images.root."
        )


# Inputs


def _colormaps() -> list[str]:
    return list(matplotlib.colormaps)


def _load_sae(ckpt: pathlib.Path) -> saev.nn.SAE:
    if not ckpt.exists():
        raise UserError(f"--ckpt {ckpt}: no such checkpoint directory or file.")
    return saev.nn.load(ckpt)


def check_compatible(sae, shards, layer: int | None, ckpt: pathlib.Path) -> int:
    """The block index to read; UserError when the SAE cannot read these shards."""
    md = shards.md
    if sae.d_vit != md.d_vit:
        raise UserError(
            f"checkpoint {ckpt} has d_vit={sae.d_vit} but shards at {shards.root} hold d_vit={md.d_vit}; "
            "pass the shards the SAE was trained on."
        )
    if md.n_patches_per_img < 1:
        raise UserError(f"shards at {shards.root} hold no patch tokens (n_patches_per_img=0).")
    if layer is None:
        layer = sae.layer
    if layer is None:
        if len(md.layers) != 1:
            raise UserError(
                f"checkpoint {ckpt} does not record its layer and shards at {shards.root} hold "
                f"layers {md.layers}; pass --layer."
            )
        layer = md.layers[0]
    if layer not in md.layers and md.resolve_layer(layer) not in md.layers:
        raise UserError(
            f"checkpoint {ckpt} was trained on layer {layer} but shards at {shards.root} hold "
            f"layers {md.layers}; pass the shards it was trained on (or --layer)."
        )
    return md.resolve_layer(layer) if layer not in md.layers else layer


# The pass and its cache


def topk_pass(
    encode, shards, layer: int, *, top_n: int, batch_size: int, device
) -> topk.TopKResult:
    d_sae = _d_sae(encode, shards, device)
    batches = iter_images(shards, layer, batch_size=batch_size, tokens="patches")
    return topk.run_pass(
        batches, encode, d_sae=d_sae, top_n=top_n, device=device, n_imgs=shards.n_imgs
    )


def _d_sae(encode, shards, device) -> int:
    # Ask the encoder instead of trusting a config field, so any callable works.
    with torch.inference_mode():
        return int(encode(torch.zeros(1, shards.md.d_vit, device=device)).shape[-1])


def cache_key(ckpt: pathlib.Path, shards, layer: int) -> str:
    """Hash of the checkpoint's files, the shard metadata and status, and the layer."""
    h = hashlib.sha256(f"saev-visuals/{CACHE_VERSION}/layer={layer}\n".encode())
    files = sorted(p for p in ckpt.iterdir() if p.is_file()) if ckpt.is_dir() else [ckpt]
    for path in files:
        h.update(f"{path.name}\n".encode())
        with open(path, "rb") as fd:
            while chunk := fd.read(1 << 20):
                h.update(chunk)
    for name in ("metadata.json", "shards.json"):
        path = shards.root / name
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def load_cache(out: pathlib.Path, key: str, top_n: int) -> topk.TopKResult | None:
    """Cached results for `key` holding at least `top_n` images per latent, else None."""
    path = out / CACHE_FILE
    if not path.is_file():
        return None
    try:
        with safetensors.safe_open(str(path), framework="pt") as fd:
            meta = fd.metadata() or {}
            if meta.get("key") != key:
                return None
            tensors = {k: fd.get_tensor(k) for k in fd.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (OSError, ValueError, safetensors.SafetensorError) as err:
        logger.warning("Ignoring unreadable cache %s (%s).", path, err)
        return None
    result = topk.TopKResult.from_tensors(tensors)
    return result if result.top_n >= top_n else None


def save_cache(out: pathlib.Path, key: str, result: topk.TopKResult) -> None:
    path = out / CACHE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    safetensors.torch.save_file(result.to_tensors(), str(tmp), metadata={"key": key})
    tmp.replace(path)


# Choosing latents


def select_latents(
    result: topk.TopKResult,
    *,
    log_freq_range: tuple[float, float],
    log_value_range: tuple[float, float],
    n_latents: int,
    include: typing.Sequence[int] = (),
    pick: str = "random",
    seed: int = 0,
) -> np.ndarray:
    """Sorted latent ids: `include` plus up to `n_latents` inside both log10 ranges."""
    bad = [i for i in include if not 0 <= i < result.d_sae]
    if bad:
        raise UserError(
            f"--include-latents {bad[0]} is out of range; the SAE has {result.d_sae} latents (0..{result.d_sae - 1})."
        )
    with np.errstate(divide="ignore"):
        log_freq = np.log10(result.freq)
        log_mean = np.log10(result.mean)
    (f_lo, f_hi), (v_lo, v_hi) = log_freq_range, log_value_range
    ok = (log_freq >= f_lo) & (log_freq <= f_hi) & (log_mean >= v_lo) & (log_mean <= v_hi)
    candidates = np.flatnonzero(ok)
    if pick == "random":
        rng = np.random.default_rng(seed)
        chosen = rng.choice(candidates, size=min(n_latents, len(candidates)), replace=False)
    else:
        score = {"freq": result.freq, "mean": result.mean, "max": result.max}[pick][candidates]
        chosen = candidates[np.argsort(-score, kind="stable")[:n_latents]]
    latents = np.union1d(chosen, np.asarray(include, dtype=np.int64)).astype(np.int64)
    if len(latents) == 0:
        alive = result.count > 0
        if alive.any():
            spans = (
                f"log10 frequency spans [{log_freq[alive].min():.2f}, {log_freq[alive].max():.2f}], "
                f"log10 mean value spans [{log_mean[alive].min():.2f}, {log_mean[alive].max():.2f}]"
            )
        else:
            spans = "no latent ever fired"
        raise UserError(
            f"no latent passes --log-freq-range {f_lo:g} {f_hi:g} and --log-value-range {v_lo:g} {v_hi:g} "
            f"({int(alive.sum())} of {result.d_sae} latents fire; {spans}); widen the ranges or pass --include-latents."
        )
    return latents


# Rendering


def render_latents(
    encode,
    shards,
    layer: int,
    result: topk.TopKResult,
    latents: np.ndarray,
    *,
    out: pathlib.Path,
    images: Recorded,
    batch_size: int,
    device,
    colormap: str = "plasma",
) -> tuple[list[site.LatentView], int, int]:
    """Draw every top image of `latents` (plain + heatmap); return views, #missing, #images.

    Only the top images are re-encoded, one batch at a time, and each is drawn as soon as
    its codes are known, so memory stays at one batch of images whatever `len(latents)`.
    """
    md = shards.md
    # For each image: the (position in latents, rank) pairs that show it.
    wanted: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for li, latent in enumerate(latents):
        for rank, img in enumerate(result.images[latent]):
            if img >= 0:
                wanted[int(img)].append((li, rank))
    imgs = sorted(wanted)
    index = images.index
    label_names = index.label_names if index is not None else []
    labels = {name: index.labels(name) for name in label_names}
    pos, sl = shards.layer_pos(layer), shards.token_slice("patches")
    latent_t = torch.as_tensor(latents, device=device)
    vmax = np.maximum(result.values[latents, 0], 1e-12)  # each latent's strongest top image

    geometry = render.model_geometry(md.vit_family, md.vit_ckpt, md.image_size)
    views_imgs: list[list[site.ImageView | None]] = [[None] * result.top_n for _ in latents]
    n_missing = 0
    bar = tqdm(total=len(imgs), unit="img", desc="rendering", dynamic_ncols=True)
    with bar, torch.inference_mode():
        for start in range(0, len(imgs), batch_size):
            batch = imgs[start : start + batch_size]
            acts = np.stack([shards.img_acts(i)[pos, sl] for i in batch]).astype(np.float32)
            f = topk.encode_patches(encode, torch.from_numpy(acts).to(device))
            grids = f.index_select(2, latent_t).cpu().numpy()  # [b, n_patches, len(latents)]
            for bi, img in enumerate(batch):
                rel = index.path(img) if index is not None else ""
                opened = images.open(img)
                image = (
                    None
                    if opened is None
                    else render.prepare_image(opened, md.image_size, geometry)
                )
                missing = image is None
                n_missing += missing
                if missing:
                    image = render.placeholder(md.image_size)
                plain = f"images/{img}.jpg"
                render.save_jpeg(image, out / plain)
                img_labels = {name: labels[name][img] for name in label_names}
                for li, rank in wanted[img]:
                    latent = int(latents[li])
                    grid = grids[bi, :, li].reshape(md.patch_grid)
                    heat = f"heatmaps/{latent}/{img}.jpg"
                    render.save_jpeg(
                        render.overlay(image, grid, float(vmax[li]), cmap=colormap), out / heat
                    )
                    views_imgs[li][rank] = site.ImageView(
                        img=img,
                        value=float(result.values[latent, rank]),
                        heatmap=heat,
                        plain=plain,
                        path=rel,
                        labels=img_labels,
                        missing=missing,
                    )
                bar.update(1)

    views = [
        site.LatentView(
            latent=int(latent),
            freq=float(result.freq[latent]),
            mean=float(result.mean[latent]),
            max=float(result.max[latent]),
            images=[v for v in views_imgs[li] if v is not None],
        )
        for li, latent in enumerate(latents)
    ]
    return views, n_missing, len(imgs)


def base_rates(index) -> dict[str, dict[str, float]]:
    """Per categorical label: the share of each value over all labelled images."""
    if index is None:
        return {}
    rates = {}
    for name in index.label_names:
        counts = collections.Counter(v for v in index.labels(name) if v != "")
        if counts and len(counts) <= MAX_LABEL_VALUES:
            total = sum(counts.values())
            rates[name] = {value: n / total for value, n in counts.items()}
    return rates


def describe_cache(out: pathlib.Path) -> dict[str, str]:
    """The metadata of OUT's cached pass (for debugging and tests)."""
    with safetensors.safe_open(str(out / CACHE_FILE), framework="pt") as fd:
        return dict(fd.metadata() or {})
