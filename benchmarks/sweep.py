"""One pass training S SAEs vs S separate `saev train` runs on the same shards (DESIGN §8).

For S in {1, 4, 8}: a TopK sweep of S members (k and lr vary) trained by one `train` call
(one pass, one stacked group, every batch read once) vs S `train` calls of one member each.
The final evaluation is skipped in both (n_eval = 0) so only training is timed; both include
their start-up (opening shards, the init sample). Prints wall times and the ratio
separate/one-pass (> 1 means the single pass is faster).

    python benchmarks/sweep.py                       # small defaults, a few minutes on 2 CPU cores
    python benchmarks/sweep.py --d-vit 768 --exp-factor 16 --n-train 20_000_000 --batch-size 16384 --device cuda
"""

import argparse
import contextlib
import io
import json
import os
import pathlib
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: it reads this once

import numpy as np  # noqa: E402

from saev.shards import Metadata, ShardWriter  # noqa: E402
from saev.train.config import Config, DataConfig, SaeConfig  # noqa: E402
from saev.train.main import train  # noqa: E402


def make_shards(root: pathlib.Path, n_imgs: int, d: int) -> pathlib.Path:
    md = Metadata(
        vit_family="timm",
        vit_ckpt="synthetic",
        layers=[10],
        n_blocks=12,
        n_patches_per_img=196,
        cls_token=True,
        d_vit=d,
        n_imgs=n_imgs,
        n_imgs_per_shard=max(1, n_imgs // 2),
        data={"kind": "synthetic"},
    )
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((4 * d, d)).astype(np.float32)
    with ShardWriter(root, md) as w:
        for i in range(0, n_imgs, 16):
            n = min(16, n_imgs - i)
            codes = rng.exponential(size=(n, 1, 197, 4 * d)) * (
                rng.random((n, 1, 197, 4 * d)) < 0.02
            )
            w.write((codes.astype(np.float32) @ atoms).astype(np.float32))
    return root


def config(
    args, shards: pathlib.Path, run_root: pathlib.Path, sweep: pathlib.Path | None, **sae
) -> Config:
    return Config(
        sweep=sweep,
        data=DataConfig(shard_root=shards, layer=10, batch_size=args.batch_size, n_threads=2),
        sae=SaeConfig(family="topk", exp_factor=args.exp_factor, **sae),
        n_train=args.n_train,
        n_init_sample=4096,
        n_eval=0,
        ckpt_every=0,
        log_every=10**9,
        run_root=run_root,
        device=args.device,
    )


def timed(cfg: Config) -> tuple[float, list[float]]:
    """Wall seconds of one `train` call and the last logged training-batch FVU of each member."""
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        run_dir = train(cfg)
    seconds = time.perf_counter() - t0
    fvus = []
    for member in sorted((run_dir / "members").iterdir()):
        last = (member / "metrics.jsonl").read_text().splitlines()[-1]
        fvus.append(json.loads(last)["fvu"])
    return seconds, fvus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--n-imgs", type=int, default=256)
    parser.add_argument("--d-vit", type=int, default=64)
    parser.add_argument("--exp-factor", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        shards = make_shards(tmp / "shards", args.n_imgs, args.d_vit)
        print(
            f"topk, d_vit={args.d_vit}, d_sae={args.d_vit * args.exp_factor}, n_train={args.n_train:,}, "
            f"batch={args.batch_size}, device={args.device}, cpus={os.cpu_count()}"
        )
        print(
            f"{'S':>3} {'one pass (s)':>13} {'S runs (s)':>11} {'ratio':>6}  final batch FVU by k"
        )
        for S in args.sizes:
            ks = [8 + 4 * i for i in range(S)]
            grid = tmp / f"grid{S}.toml"
            grid.write_text(f"[sae]\nk = {ks}\n")
            one, fvus = timed(config(args, shards, tmp / f"one{S}", grid))
            runs = [timed(config(args, shards, tmp / f"sep{S}-{k}", None, k=k)) for k in ks]
            separate = sum(t for t, _ in runs)
            # Members of the one-pass run are named in k order; a stacked member must match its solo run.
            fvu_text = " ".join(
                f"k{k}={f:.3f}" + ("" if abs(f - solo[0]) < 1e-3 else f"(solo {solo[0]:.3f})")
                for k, f, (_, solo) in zip(ks, fvus, runs, strict=True)
            )
            print(f"{S:>3} {one:>13.2f} {separate:>11.2f} {separate / one:>6.2f}  {fvu_text}")
        print("ratio: S separate runs / one pass (> 1: the stacked pass is faster).")


if __name__ == "__main__":
    main()
