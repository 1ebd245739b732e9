"""Files in saev 0.1's own formats, written the way 0.1 wrote them, and 0.1's SAE forward.

What 0.1 wrote (its saev/activations.py, saev/nn.py and saev/training.py):
- a shard directory `<dump_to>/<sha256 of metadata.json>/` holding `metadata.json` (the
  keys of its `Metadata` dataclass, `data` as `str()` of the dataset config, indent 4) and
  `acts000000.bin`, ... float32 `[n_imgs_per_shard, n_layers, n_patches + 1, d_vit]`, every
  file full size (np.memmap mode w+), images in DataLoader order, no image index;
- a run directory `<ckpt_path>/<wandb id>/` holding `sae.pt` (one JSON line of the SAE
  config, then `torch.save(state_dict)`) and `config.json` (the whole training config).
"""

import dataclasses
import hashlib
import json
import pathlib

import numpy as np
import torch
from factories import make_images


def write_shards(
    dump_to: pathlib.Path,
    acts: np.ndarray,
    *,
    data: str,
    layers=(-2,),
    vit_family="timm",
    vit_ckpt="test_vit",
    n_patches_per_shard=None,
    n_imgs=None,
) -> pathlib.Path:
    """`acts` [n, n_layers, n_patches + 1, d] as 0.1's ShardWriter laid them out; `n_imgs` is
    what 0.1's dataset config counted (ImageFolderDataset counted every file)."""
    n, n_layers, n_tok, d = acts.shape
    n_imgs = n if n_imgs is None else n_imgs
    n_patches_per_shard = n_patches_per_shard or n_layers * n_tok * 4  # 4 images per shard
    md = {
        "vit_family": vit_family,
        "vit_ckpt": vit_ckpt,
        "layers": list(layers),
        "n_patches_per_img": n_tok - 1,
        "cls_token": True,
        "d_vit": d,
        "seed": 42,
        "n_imgs": n_imgs,
        "n_patches_per_shard": n_patches_per_shard,
        "data": data,
    }
    digest = hashlib.sha256(json.dumps(md, sort_keys=True).encode()).hexdigest()
    root = dump_to / digest
    root.mkdir(parents=True)
    (root / "metadata.json").write_text(json.dumps(md, indent=4))
    per = n_patches_per_shard // n_layers // n_tok
    padded = np.zeros((max(n_imgs, n), n_layers, n_tok, d), np.float32)
    padded[:n] = acts
    # 0.1 opened the next shard whenever one filled up, so a full last shard has a zero file after it.
    for s in range(len(padded) // per + 1):
        shard = np.zeros((per, n_layers, n_tok, d), np.float32)
        chunk = padded[s * per : (s + 1) * per]
        shard[: len(chunk)] = chunk
        shard.tofile(root / f"acts{s:06d}.bin")
    return root


SAE_CFG = {
    "d_vit": 16,
    "exp_factor": 2,
    "sparsity_coeff": 4e-4,
    "ghost_grads": False,
    "remove_parallel_grads": True,
    "normalize_w_dec": True,
    "seed": 0,
}
"""0.1's `config.SparseAutoencoder` as `vars(cfg)` put it in the header line of sae.pt."""


def random_state(d_vit=16, d_sae=32, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_vit, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    return {
        "W_enc": W_dec.T.contiguous() + 0.1 * torch.randn(d_vit, d_sae, generator=g),
        "b_enc": 0.1 * torch.randn(d_sae, generator=g),
        "W_dec": W_dec,
        "b_dec": 0.1 * torch.randn(d_vit, generator=g),
    }


def write_sae_pt(path: pathlib.Path, state: dict, header: dict | None = None) -> pathlib.Path:
    """0.1's `nn.dump`: the config as one JSON line, then `torch.save(state_dict)`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fd:
        fd.write((json.dumps(header or SAE_CFG) + "\n").encode("utf-8"))
        torch.save(state, fd)
    return path


@dataclasses.dataclass(frozen=True)
class Run:
    """Arguments of 0.1's training config that the tests vary."""

    shard_root: str
    layer: int = -2
    patches: str = "patches"
    scale_mean: bool = True
    scale_norm: bool = True


def write_run(ckpt_path: pathlib.Path, run_id: str, state: dict, run: Run) -> pathlib.Path:
    """0.1's `training.main`: `<ckpt_path>/<id>/sae.pt` and the whole Train config beside it."""
    run_dir = ckpt_path / run_id
    write_sae_pt(run_dir / "sae.pt", state)
    train_cfg = {
        "data": {
            "shard_root": run.shard_root,
            "patches": run.patches,
            "layer": run.layer,
            "clamp": 1e5,
            "n_random_samples": 2**19,
            "scale_mean": run.scale_mean,
            "scale_norm": run.scale_norm,
        },
        "n_workers": 32,
        "n_patches": 100_000_000,
        "sae": SAE_CFG,
        "n_sparsity_warmup": 0,
        "lr": 4e-4,
        "n_lr_warmup": 500,
        "sae_batch_size": 16384,
        "track": True,
        "wandb_project": "saev",
        "tag": "",
        "log_every": 25,
        "ckpt_path": str(ckpt_path),
        "device": "cuda",
        "seed": 42,
        "slurm": False,
        "slurm_acct": "",
        "log_to": "./logs",
    }
    (run_dir / "config.json").write_text(json.dumps(train_cfg, indent=4))
    return run_dir


def forward(state: dict, x: torch.Tensor, sparsity_coeff: float):
    """0.1's `SparseAutoencoder.forward` on a [batch, d] input: (x_hat, f_x, loss terms
    mse, sparsity, ghost_grad, l0, l1), as its saev/nn.py computed them."""
    f_x = torch.relu((x - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
    x_hat = f_x @ state["W_dec"] + state["b_dec"]
    upper = x.abs().max()  # 0.1's "safe" MSE: the same value, computed on x / max|x|
    mse = (((x_hat / upper) - (x / upper)) ** 2 * upper * upper).mean()
    l0 = (f_x > 0).float().sum(axis=1).mean(axis=0)
    l1 = f_x.sum(axis=1).mean(axis=0)
    return x_hat, f_x, (mse, sparsity_coeff * l1, torch.zeros_like(mse), l0, l1)


@dataclasses.dataclass(frozen=True)
class World:
    """A 0.1 recording of an image folder and two 0.1 runs on it (raw and scaled inputs)."""

    imgs: pathlib.Path
    shards: pathlib.Path
    acts: np.ndarray
    """[n_imgs, 1, 5, 16]: what the shards hold, the 0.1 padding row included."""
    state: dict
    raw: pathlib.Path
    """Run directory trained with scale_mean = scale_norm = false (0.1's guide's advice)."""
    scaled: pathlib.Path
    """Run directory trained with 0.1's defaults, scale_mean = scale_norm = true."""


def make_world(tmp: pathlib.Path, n_per_class: int = 10) -> World:
    """An ImageFolder (cat/ red images, dog/ blue ones, and a README.txt that 0.1 counted as an
    image), its 0.1 shards (patch tokens shifted by +mu for cats, -mu for dogs; 4 patches,
    d_vit 16, layer -2) and two 0.1 run directories of one random SAE."""
    rng = np.random.default_rng(0)
    imgs = tmp / "imgs"
    for cls, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        paths = [f"{cls}/{i}.png" for i in range(n_per_class)]
        make_images(imgs, paths, colours=[colour] * n_per_class, noise=20, rng=rng)
    (imgs / "README.txt").write_text("0.1 counted every file as an image")
    n = 2 * n_per_class
    mu = rng.normal(size=16).astype(np.float32)
    acts = rng.normal(size=(n + 1, 1, 5, 16)).astype(np.float32) * 0.5 + 3.0
    acts[:n_per_class] += mu
    acts[n_per_class:n] -= mu
    acts[n] = 0.0  # the README's row: 0.1's shard file held zeros there
    shards = write_shards(
        tmp / "shards", acts[:n], data=f"ImageFolderDataset(root={str(imgs)!r})", n_imgs=n + 1
    )
    state = random_state()
    raw = write_run(
        tmp / "checkpoints", "raw01", state, Run(str(shards), scale_mean=False, scale_norm=False)
    )
    scaled = write_run(tmp / "checkpoints", "scaled01", state, Run(str(shards)))
    return World(imgs, shards, acts, state, raw, scaled)
