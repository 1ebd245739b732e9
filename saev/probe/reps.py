"""Per-image representations, built in one streaming pass over the shards and cached.

Names: `raw-cls` (the ViT's CLS token), `raw-mean` (mean of its patch tokens), `sae-mean` and
`sae-max` (the SAE's codes of the image's patch tokens, mean- or max-pooled; `sae_pool_tokens`
says which tokens). Each is a float32 `[n_imgs, d]` array stored as `OUT/reps/<name>.npy` next to
`<name>.json`, the key it was built with (shard metadata and root, layer, checkpoint
fingerprint). A later run reuses an array whose key matches and rebuilds the others. Arrays
are written to a hidden temp file and renamed once complete; the key is written after.
"""

import json
import logging
import os
import pathlib
import typing

import numpy as np
import torch
from tqdm.auto import tqdm

from saev.errors import UserError
from saev.helpers import atomic_write_json
from saev.shards import Shards, iter_images

logger = logging.getLogger("saev.probe.reps")

RAW = {"cls": "raw-cls", "mean": "raw-mean"}
SAE = {"mean": "sae-mean", "max": "sae-max"}


def ckpt_fingerprint(ckpt: str | os.PathLike) -> dict:
    """Names, sizes and modification times of a checkpoint's files: cheap, and changes
    whenever the weights are rewritten."""
    path = pathlib.Path(ckpt)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return {
        "path": str(path.resolve()),
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


def check(shards: Shards, names: list[str]) -> None:
    """UserError unless the shards can give every representation in `names`."""
    if "raw-cls" in names and not shards.md.cls_token:
        raise UserError(
            f"{shards.root}: --raw-token cls asked, but this ViT has no CLS token; "
            "use --raw-token mean."
        )


def sae_pool_tokens(sae: typing.Any) -> str:
    """The tokens whose SAE codes are pooled per image: the patch tokens (DESIGN section 7),
    also for an SAE trained on all tokens, so that SAEs trained on patches and on all tokens
    are probed on the same tokens and the CLS token never dominates a max; only an SAE trained
    on the CLS token alone reads the CLS token."""
    return "cls" if getattr(sae, "tokens", None) == "cls" else "patches"


def cache_key(shards: Shards, layer: int, name: str, ckpt: dict | None) -> dict:
    return {
        "rep": name,
        "shard_root": str(shards.root.resolve()),
        "metadata": shards.md.to_json(),
        "layer": layer,
        "ckpt": ckpt if name.startswith("sae-") else None,
    }


def cached(out: pathlib.Path, name: str, key: dict) -> bool:
    """Whether `out/reps/<name>.npy` exists and was built with `key`."""
    npy, meta = out / "reps" / f"{name}.npy", out / "reps" / f"{name}.json"
    if not npy.is_file() or not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()) == json.loads(json.dumps(key))
    except json.JSONDecodeError:
        return False


def build(
    out: pathlib.Path,
    shards: Shards,
    layer: int,
    names: list[str],
    *,
    sae: typing.Any = None,
    ckpt_print: dict | None = None,
    batch_size: int = 64,
    device: torch.device = torch.device("cpu"),
) -> dict[str, str]:
    """Make sure every representation in `names` is cached in `out/reps`; returns
    {name: "cached" | "built"}."""
    check(shards, names)
    reps_dir = out / "reps"
    reps_dir.mkdir(parents=True, exist_ok=True)
    keys = {n: cache_key(shards, layer, n, ckpt_print) for n in names}
    todo = [n for n in names if not cached(out, n, keys[n])]
    status = {n: ("built" if n in todo else "cached") for n in names}
    if not todo:
        return status
    n_imgs = shards.n_imgs
    md = shards.md
    sae_names = [n for n in todo if n.startswith("sae-")]
    if sae_names:
        sae = sae.to(device) if hasattr(sae, "to") else sae
        if hasattr(sae, "eval"):
            sae.eval()
        sae_slice = shards.token_slice(sae_pool_tokens(sae))
    dims = {n: (sae.d_sae if n.startswith("sae-") else md.d_vit) for n in todo}
    tmps = {n: reps_dir / f".{n}.npy.tmp" for n in todo}
    arrays = {
        n: np.lib.format.open_memmap(tmps[n], mode="w+", dtype=np.float32, shape=(n_imgs, dims[n]))
        for n in todo
    }
    patches = shards.token_slice("patches")
    try:
        bar = tqdm(total=n_imgs, desc="representations", unit="img", unit_scale=True)
        with torch.inference_mode():
            for idx, x in iter_images(shards, layer, batch_size=batch_size, tokens="all"):
                lo, hi = int(idx[0]), int(idx[-1]) + 1
                x = x.to(device, non_blocking=True)
                if "raw-cls" in todo:
                    arrays["raw-cls"][lo:hi] = x[:, 0].cpu().numpy()
                if "raw-mean" in todo:
                    arrays["raw-mean"][lo:hi] = x[:, patches].mean(1).cpu().numpy()
                if sae_names:
                    t = x[:, sae_slice]
                    b, n_tok, d = t.shape
                    f = sae.encode(t.reshape(b * n_tok, d)).reshape(b, n_tok, -1).float()
                    if "sae-mean" in todo:
                        arrays["sae-mean"][lo:hi] = f.mean(1).cpu().numpy()
                    if "sae-max" in todo:
                        arrays["sae-max"][lo:hi] = f.amax(1).cpu().numpy()
                bar.update(hi - lo)
        bar.close()
        for n in todo:
            arrays[n].flush()
            del arrays[n]
            os.replace(tmps[n], reps_dir / f"{n}.npy")
            atomic_write_json(reps_dir / f"{n}.json", keys[n])
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    return status


def load(out: pathlib.Path, name: str, device: torch.device, chunk: int = 8192) -> torch.Tensor:
    """A cached representation as a float32 tensor on `device`, copied in row chunks so the
    host never holds a second full copy."""
    arr = np.load(out / "reps" / f"{name}.npy", mmap_mode="r")
    x = torch.empty(arr.shape, dtype=torch.float32, device=device)
    for lo in range(0, arr.shape[0], chunk):
        x[lo : lo + chunk] = torch.from_numpy(np.array(arr[lo : lo + chunk])).to(device)
    return x
